"""The HTTP server: clip-back compatible endpoints, the versioned ``/api/v1``, thumbnails, metrics and the page.

Build an app with :func:`retrieval.serve.app.create_app` from a :class:`retrieval.serve.config.ServeConfig`;
``retrieval serve`` runs one on uvicorn.
"""
