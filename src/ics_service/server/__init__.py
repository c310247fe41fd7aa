"""The HTTP service (`ics serve`): one FastAPI app over the engine, one module per protocol."""

from .app import create_app

__all__ = ["create_app"]
