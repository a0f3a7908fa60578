"""``python -m bench``: measure the engine against its performance targets.

Runs the core groups below and the feature groups of ``bench/groups.py`` (``--only NAME,…``
for some of them), prints one table and writes ``bench-results/bench.json`` (schema
``machina-bench/2``) and ``bench.md``. Every verdict is computed from the numbers in its row
(see ``bench/_rows.py``); a group that fails gives an ERROR row and the others still run.
``--compare OLD.json`` prints each figure's ratio to an earlier result; with ``--results
NEW.json`` it compares two files without measuring anything.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import ROOT, progress
from bench._rows import Row, error_row, from_dict

SCHEMA = "machina-bench/2"


@dataclass(frozen=True)
class Context:
    quick: bool


GroupFn = Callable[[Context], Awaitable[list[Row]]]


def core_groups() -> list[tuple[str, str, GroupFn]]:
    """(name, title, measure) of the core groups, in the order they run."""
    from bench import core, s3, turns

    return [
        ("turns", "Per turn through gRPC, beside LangGraph", turns.rows),
        ("adapters", "Building model requests", core.adapters_group),
        ("streams", "Event streams", core.streams_group),
        ("runs", "Runs, approvals, memory, cold start", core.runs_group),
        ("handoff", "Handoff to a runner", core.handoff_group),
        ("workdir", "Run directory snapshots", core.workdir_group),
        ("sandbox", "Sandbox", core.sandbox_group),
        ("s3", "S3-compatible storage (moto on loopback)", s3.rows),
    ]


def feature_group(module: str) -> GroupFn:
    """A bench/groups.py module's ``rows(quick)`` as a group (its dict rows become Rows)."""

    async def measure(ctx: Context) -> list[Row]:
        mod = importlib.import_module(f"bench.{module}")
        return [from_dict(doc, module) for doc in await mod.rows(ctx.quick)]

    return measure


def registry() -> list[tuple[str, str, GroupFn]]:
    from bench.groups import GROUPS

    return [*core_groups(), *((module, title, feature_group(module)) for module, title in GROUPS)]


def select(groups: list[tuple[str, str, GroupFn]], only: str | None) -> list[tuple[str, str, GroupFn]]:
    if not only:
        return groups
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    known = {name for name, _, _ in groups}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [g for g in groups if g[0] in wanted]


async def run_group(name: str, title: str, measure: GroupFn, ctx: Context) -> dict[str, Any]:
    """One group's rows; an exception becomes one ERROR row (the traceback goes to stderr)."""
    started = time.perf_counter()
    try:
        rows = await measure(ctx)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        rows = [error_row(f"{title}: the group failed", exc)]
    for r in rows:
        r.group = name
    return {
        "name": name,
        "title": title,
        "seconds": time.perf_counter() - started,
        "rows": [r.as_dict() for r in rows],
    }


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> str:
    python = platform.python_version()
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {python}, {platform.system()}"


async def measure_all(groups: list[tuple[str, str, GroupFn]], quick: bool) -> dict[str, Any]:
    ctx = Context(quick)
    load_before, started = _load(), time.time()
    done = []
    for name, title, fn in groups:
        progress(f"== {name}: {title}")
        done.append(await run_group(name, title, fn, ctx))
    return {
        "schema": SCHEMA,
        "machine": machine(),
        "quick": quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "load": {"before": load_before, "after": _load()},
        "groups": done,
    }


# -- output -------------------------------------------------------------------------------

HEADER = ("what", "measured", "target", "verdict")


def _cells(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(r["name"], r["value"], r["target"] or "—", r["verdict"]) for r in doc["rows"]]


def text_table(result: dict[str, Any]) -> str:
    rows = [c for g in result["groups"] for c in _cells(g)]
    widths = [min(90, max(len(r[i]) for r in [*rows, HEADER])) for i in range(4)]
    lines = [
        f"Machina bench — {result['machine']}{' (--quick)' if result['quick'] else ''}",
        _describe_load(result),
    ]
    for group in result["groups"]:
        lines += ["", f"## {group['title']} [{group['name']}] ({group['seconds']:.0f} s)"]
        lines.append(" | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)))
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in _cells(group)]
    counts = verdict_counts(result)
    lines += ["", "verdicts: " + ", ".join(f"{v} {n}" for v, n in counts.items())]
    return "\n".join(lines)


def _describe_load(result: dict[str, Any]) -> str:
    load = result.get("load") or {}
    before, after = load.get("before") or [], load.get("after") or []
    if not before:
        return "load average: unknown"
    return f"load average (1/5/15 min) before {before} and after {after}; {result['seconds']:.0f} s in all"


def verdict_counts(result: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in result["groups"]:
        for r in group["rows"]:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    return counts


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['machine']}{' (--quick)' if result['quick'] else ''}; {_describe_load(result)}", ""]
    lines += ["| what | measured | target | verdict |", "|---|---|---|---|"]
    for group in result["groups"]:
        lines.append(f"| **{group['title']}** | | | |")
        for a, b, c, d in _cells(group):
            lines.append(f"| {a} | {b} | {c} | {'**MISSED**' if d == 'MISSED' else d} |")
    return "\n".join(lines) + "\n"


# -- compare ------------------------------------------------------------------------------


def compare(new: dict[str, Any], old: dict[str, Any]) -> list[tuple[str, str, float, float, float]]:
    """(row, figure, old, new, new ÷ old) for every figure both results have (matched by group and name)."""
    before = {(g["name"], r["name"]): r for g in old.get("groups", []) for r in g["rows"]}
    out = []
    for group in new.get("groups", []):
        for r in group["rows"]:
            prior = before.get((group["name"], r["name"]))
            if prior is None:
                continue
            for key, value in r.get("figures", {}).items():
                was = prior.get("figures", {}).get(key)
                if isinstance(was, int | float) and isinstance(value, int | float):
                    ratio = value / was if was else float("nan")
                    out.append((r["name"], key, float(was), float(value), ratio))
    return out


def compare_text(pairs: list[tuple[str, str, float, float, float]]) -> str:
    if not pairs:
        return "no figure in common with the earlier result"
    lines = ["new ÷ old for each figure both results have:"]
    for name, key, was, now, ratio in pairs:
        lines.append(f"  {ratio:7.3f}×  {name} [{key}]: {was:,.4g} → {now:,.4g}")
    return "\n".join(lines)


def load_result(path: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise SystemExit(f"{path} is not a {SCHEMA} result (schema {doc.get('schema')!r})")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer and smaller repetitions (a smoke run)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these groups (see --list)")
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument(
        "--out", default=str(ROOT / "bench-results" / "bench.json"), help="where to write the result"
    )
    parser.add_argument(
        "--compare", metavar="OLD.json", help="print each figure's ratio to an earlier result"
    )
    parser.add_argument(
        "--results", metavar="NEW.json", help="with --compare: compare this file, measure nothing"
    )
    ns = parser.parse_args(argv)
    groups = registry()
    if ns.list:
        for name, title, _ in groups:
            print(f"{name:12} {title}")
        return 0
    if ns.results:
        if not ns.compare:
            parser.error("--results needs --compare OLD.json")
        print(compare_text(compare(load_result(ns.results), load_result(ns.compare))))
        return 0
    old = load_result(ns.compare) if ns.compare else None
    result = asyncio.run(measure_all(select(groups, ns.only), ns.quick))
    print("\n" + text_table(result))
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    if old is not None:
        print("\n" + compare_text(compare(result, old)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
