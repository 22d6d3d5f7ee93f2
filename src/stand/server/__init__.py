"""The OpenAI-compatible server: config (ServerConfig), protocol (schemas, errors, responses), metrics,
worker (the engine thread, incremental text), app (routes, auth, serve)."""

from stand.server.app import create_app, serve
from stand.server.config import ServerConfig
from stand.server.worker import TextStream

__all__ = ["ServerConfig", "TextStream", "create_app", "serve"]
