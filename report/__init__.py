"""Reports of runs: the document (document.py) with its numbers (model.py), text (format.py) and plots (plots.py),
and the SQLite index of runs (index.py)."""
