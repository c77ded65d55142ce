"""Reports of runs: the document with its plots (document.py) and the SQLite index of runs (index.py)."""
