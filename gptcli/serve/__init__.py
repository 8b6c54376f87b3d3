"""`gpt serve`: an OpenAI-compatible API over the one decode engine. ``protocol`` (request and
response shapes, the one server-sent-events loop), ``server`` (app, rules, lifecycle),
``scheduler`` (continuous batching over ``decode.Engine``)."""

from .server import run_server

__all__ = ["run_server"]
