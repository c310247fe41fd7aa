"""ICS, the Image Classification Service."""

# The one place the version is written (pyproject.toml reads it): importlib.metadata
# would cost every `ics` start-up about 60 ms.
__version__ = "0.1.0"
