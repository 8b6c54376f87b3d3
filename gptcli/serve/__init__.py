"""`gpt serve`: an OpenAI-compatible API over the one decode engine. ``protocol`` (request and
response shapes, the one server-sent-events loop), ``server`` (app, rules, lifecycle),
``guard`` (the API key, and HTTP's own errors in OpenAI's shape), ``scheduler`` (continuous
batching over ``decode.Engine``)."""

from .server import run_server

__all__ = ["run_server"]
