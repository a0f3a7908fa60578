"""Fixtures for the engine's tests: ``harness``, the agent loop in process (tests/engine/harness.py)."""

from tests.engine.harness import harness

__all__ = ["harness"]
