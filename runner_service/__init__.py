"""Machina runner: continues runs handed off by an engine that lacks a capability.

It serves the runner's HTTP contract (``POST /continue`` with a bearer secret,
``GET /health``) and the same operation as gRPC ``machina.runner.v1.RunnerService``.
A run is continued with the engine core over the same storage root, with the
real tools, and is never run twice at the same time (the run's lease).
"""

from runner_service._config import RunnerConfig
from runner_service._runner import Rejected, Runner

__all__ = ["Rejected", "Runner", "RunnerConfig"]
