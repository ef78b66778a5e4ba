"""`medtransfer experiment`: a grid of training runs on one split, evaluated and compared (see runner.py)."""
