"""MR-MKG's knowledge path (arXiv 2406.02030) as an option of ELMM: docs/knowledge.md."""
