"""Serving: an OpenAI-compatible HTTP server over the thin runtime, with continuous batching.

``scheduler.py`` (one thread owns the Pipeline and runs the batch), ``openai_api.py`` (requests checked,
media resolved, response objects), ``app.py`` (FastAPI routes), ``server.py`` (uvicorn, ``LocalServer``),
``command.py`` (``qvl-export serve``), ``loadtest.py`` (``qvl-export bench --serve``). fastapi and uvicorn are
imported only where a server is made (the ``serve`` extra); nothing here imports torch or transformers.
"""
