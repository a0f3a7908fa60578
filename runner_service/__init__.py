"""Machina runner: resumes runs handed off by an engine that lacks a capability.

Only the package skeleton exists so far; the runner issue builds the
RunnerService (gRPC) and the ``POST /continue`` / ``GET /health`` HTTP shim.
"""
