"""A throw-away PostgreSQL cluster (Debian's `postgresql` package) for the control-plane tests."""

from __future__ import annotations

from engine_service.testing import new_database, postgres_bin, running_postgres

__all__ = ["new_database", "postgres_bin", "running_postgres"]
