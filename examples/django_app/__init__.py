"""Django: `uvicorn examples.django_app.asgi:application`, then open `/chat/<id>?prompt=hi` with
the browser's `EventSource`; `POST /chat/<id>/stop` stops it. No database: the streams live in
the resumable-stream context (Redis with `REDIS_URL`, else in memory)."""
