"""The apps that the framework tests run under uvicorn: one per framework, each serving the same
routes through its adapter, with the knobs a test needs (see `common.py`)."""
