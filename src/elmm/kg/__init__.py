"""Knowledge graphs: the canonical format (format.py), the synthetic world (synthetic.py), and the real
sources (ingest.py: download.py, archive.py, mkgformer.py, images.py)."""
