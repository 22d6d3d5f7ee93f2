"""The OpenAI-compatible server: config (ServerConfig), memory (a request's worst case), protocol (schemas,
errors, responses), metrics, gate (auth, body limit), worker (the engine thread, incremental text), app (routes,
serve). The names below load on first use, so `stand.server.config` imports without torch or fastapi."""

import importlib

__all__ = ["ServerConfig", "TextStream", "create_app", "serve"]
_WHERE = {"ServerConfig": "config", "TextStream": "text", "create_app": "app", "serve": "app"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'stand.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"stand.server.{_WHERE[name]}"), name)
