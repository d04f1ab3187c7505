"""The Django test project (routes: see `../common.py`)."""
