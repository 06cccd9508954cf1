"""Multi-user real-time speech-to-text server: WebSocket in, live and final text out."""

from .config import Config
from .server import Server, serve
from .version import __version__

__all__ = ["Config", "Server", "__version__", "serve"]
