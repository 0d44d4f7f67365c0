"""`kiln serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `AsyncEngine`, with streaming,
embeddings, Prometheus metrics, API-key auth and a web chat playground.

Start one with `kiln serve --model DIR` or `kiln.server.app.serve(model_dir)`. This package needs the
`server` extra; importing it stays cheap so that the CLI loads without it.
"""
