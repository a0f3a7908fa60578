"""The optional PostgreSQL control plane (``MACHINA_CONTROL_URL``; the ``postgres`` extra)."""

from __future__ import annotations

from engine_service.control._postgres import PostgresControl, migrate, migrations
from engine_service.control._reindex import reindex

__all__ = ["PostgresControl", "migrate", "migrations", "reindex"]
