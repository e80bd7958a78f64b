"""The HTTP service: the FastAPI app over a run's query engine, and what runs it.

Modules:
    app         ``create_app``: routes, lifespan (opens the run), error -> status, the dashboard
    middleware  plain ASGI: refusals from headers alone (API key first), body limit, drain, Prometheus metrics
    serving     uvicorn with bounds on what clients can hold (header time, connections), bounded drain on SIGTERM
    watch       live reload: the run's files fingerprinted every ``watch_s``; the engine rebuilt and swapped
    batching    micro-batching of concurrent influence requests
    docs        ``/docs`` and ``/redoc`` from packaged Swagger UI / ReDoc files (no CDN)

Import ``gradstore.server.http.app`` explicitly; this package itself loads nothing.
"""
