"""Multi-user real-time speech-to-text server: WebSocket in, live and final text out."""

from .config import Config
from .server import Server, serve

__all__ = ["Config", "Server", "serve"]
__version__ = "0.1.0"
