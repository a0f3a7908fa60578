"""The bench's rows and targets: every verdict is computed from the numbers a row carries.

A row has a name, its measurement formatted for people (``value``), the goal in words
(``target``), its ``figures`` (the numbers the verdict and ``--compare`` use, e.g.
``{"p50_ms": 0.8}``) and ``data`` (raw sample summaries for ``bench.json``). Verdicts:

- ``MET`` / ``MISSED``: the row has a :class:`Target`; every check holds / one does not, or a
  figure a check needs is missing or not a number (a measurement that could not be made
  cannot meet its target);
- ``REPORT``: no target, the figure is there to be read;
- ``N/A``: cannot be measured on this machine (``value`` says why);
- ``ERROR``: the measurement raised (``value`` has the exception).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

Op = Literal["<=", ">=", "<", ">"]
VERDICTS = ("MET", "MISSED", "REPORT", "N/A", "ERROR")


@dataclass(frozen=True)
class Check:
    figure: str
    op: Op
    limit: float

    def holds(self, figures: dict[str, float]) -> bool:
        value = figures.get(self.figure)
        if value is None or not isinstance(value, int | float) or math.isnan(value):
            return False
        match self.op:
            case "<=":
                return value <= self.limit
            case ">=":
                return value >= self.limit
            case "<":
                return value < self.limit
            case ">":
                return value > self.limit


@dataclass(frozen=True)
class Target:
    """A goal in words and the checks (all must hold) that decide it."""

    text: str
    checks: tuple[Check, ...]

    def met(self, figures: dict[str, float]) -> bool:
        return all(check.holds(figures) for check in self.checks)


def at_most(figure: str, limit: float, text: str) -> Target:
    return Target(text, (Check(figure, "<=", limit),))


def at_least(figure: str, limit: float, text: str) -> Target:
    return Target(text, (Check(figure, ">=", limit),))


@dataclass
class Row:
    name: str
    value: str
    target: str = ""
    verdict: str = "REPORT"
    figures: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    group: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "value": self.value,
            "target": self.target,
            "verdict": self.verdict,
            "figures": self.figures,
            "data": self.data,
        }


def row(
    name: str,
    value: str,
    figures: dict[str, float],
    target: Target | None = None,
    data: dict[str, Any] | None = None,
) -> Row:
    """A measured row; its verdict comes from ``target``'s checks on ``figures`` (REPORT without one)."""
    if target is None:
        return Row(name, value, "", "REPORT", figures, data or {})
    return Row(name, value, target.text, "MET" if target.met(figures) else "MISSED", figures, data or {})


def not_available(name: str, reason: str, target: str = "") -> Row:
    return Row(name, f"not measured: {reason}", target, "N/A")


def error_row(name: str, exc: BaseException) -> Row:
    text = f"{type(exc).__name__}: {exc}".strip()
    return Row(name, text[:300], "", "ERROR")


def from_dict(doc: dict[str, Any], group: str) -> Row:
    """A feature group's row dict (see bench/groups.py) as a Row; an unknown verdict is an ERROR."""
    verdict = str(doc.get("verdict", "ERROR"))
    data = dict(doc.get("data") or {})
    figures = {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    name, value = str(doc.get("name", "?")), str(doc.get("value", ""))
    if verdict not in VERDICTS:
        return Row(name, f"{value} (unknown verdict {verdict!r})", str(doc.get("target", "")), "ERROR",
                   figures, data, group)  # fmt: skip
    return Row(name, value, str(doc.get("target", "")), verdict, figures, data, group)


# -- sample summaries ---------------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, float]:
    """Median, p95, p99 (nearest rank), min and max of a sample; NaN for an empty one."""
    if not values:
        nan = float("nan")
        return {"median": nan, "p95": nan, "p99": nan, "min": nan, "max": nan, "n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]

    return {
        "median": statistics.median(ordered),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def ms(s: dict[str, float], digits: int = 2, tail: str = "p95") -> str:
    """``1.23 ms (p95 1.50)`` or, with ``tail="range"``, ``1.23 ms (1.10–1.50, n=3)``."""
    if not s.get("n"):
        return "no samples"
    if tail == "range":
        return f"{s['median']:.{digits}f} ms ({s['min']:.{digits}f}–{s['max']:.{digits}f}, n={s['n']:.0f})"
    return f"{s['median']:.{digits}f} ms ({tail} {s[tail]:.{digits}f})"


def ratio_text(s: dict[str, float], digits: int = 3) -> str:
    if not s.get("n"):
        return "no samples"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}×"
    return f"{s['median']:.{digits}f}× ({s['min']:.{digits}f}–{s['max']:.{digits}f})"
