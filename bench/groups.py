"""The bench's feature groups, beside the core table in ``bench/__main__.py``.

Each group is a module under ``bench/`` exposing::

    async def rows(quick: bool) -> list[dict[str, Any]]

where every row is ``{"name": str, "value": str, "target": str, "verdict": str, "data": dict}``:
``value`` is the formatted measurement (medians, with p95/p99 where the tail matters),
``target`` the goal in words (``""`` when the row only reports), ``verdict`` one of ``MET``,
``MISSED``, ``REPORT``, ``N/A`` (cannot be measured here, ``value`` says why) or ``ERROR``, always
computed from the numbers, and ``data`` the raw numbers written to ``bench.json`` (its numeric
values are the figures ``--compare`` sets beside an earlier result). A group measures its own
side-by-side baselines in the same run; if ``rows`` raises, the group shows one ERROR row and
the rest of the bench runs on. Register a group with one line here; ``python -m bench --only
NAME`` runs it alone.
"""

from __future__ import annotations

# (module under bench/, title printed above its rows)
GROUPS: list[tuple[str, str]] = [
    ("control", "Several engines: the PostgreSQL control plane beside the embedded mode"),
    ("compaction", "Context compaction: model input per turn of a long run"),
    ("fastpath", "The durable fast path: per turn, approvals and streams through gRPC"),
    ("tracing", "Tracing: per-turn cost on beside off"),
    ("threads", "Threads: long conversations and deletion"),
]
