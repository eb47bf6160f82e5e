"""wschat as an embedder runs it: create_app() on uvicorn's default settings (bench/run.py)."""
from wschat import create_app
app = create_app(rate=0, timeout=0, max_connections=20000)
