"""MCP servers written for the tests (third-party ones come from PyPI)."""
