"""Serving: the continuous-batching `Scheduler` and the OpenAI-compatible HTTP app (`create_app`, which
needs the `serve` extra: FastAPI and uvicorn)."""

from __future__ import annotations

from typing import Any

from .scheduler import Event, QueueFull, Request, RequestError, SamplingParams, Scheduler

__all__ = ["Event", "QueueFull", "Request", "RequestError", "SamplingParams", "Scheduler", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported on use, so the engine works without FastAPI installed
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
