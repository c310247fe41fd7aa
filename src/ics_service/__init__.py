"""ICS, the Image Classification Service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ics-service")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
