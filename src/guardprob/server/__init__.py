"""The HTTP moderation service: OpenAI-compatible ``/v1/moderations`` plus ``/v1/classify``.

fastapi, uvicorn and prometheus-client load only when ``create_app`` or ``guardprob serve`` is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guardprob.server.config import ServerConfig, load_config

if TYPE_CHECKING:
    from guardprob.server.app import create_app

__all__ = ["ServerConfig", "create_app", "load_config"]


def __getattr__(name: str):
    if name == "create_app":
        from guardprob.server.app import create_app

        return create_app
    raise AttributeError(f"module 'guardprob.server' has no attribute {name!r}")
