"""ELMM: multimodal knowledge graph completion with a compressed, attention-pruned LLaVA-style model."""

__version__ = "0.1.0"
