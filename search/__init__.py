"""The precision search: the algorithm over callbacks (algorithm.py) and its evaluation cache (evalcache.py)."""
