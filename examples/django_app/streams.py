"""The process's context: made here, opened by the server's lifespan (see `asgi.py`)."""

from resumable_stream import create_resumable_stream_context

streams = create_resumable_stream_context()  # REDIS_URL, else in memory
