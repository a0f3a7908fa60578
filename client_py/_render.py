"""Text and HTML renderings of runs for people (terminals and notebooks).

Every value shown in HTML comes from the model, a tool or a caller, so all of it
goes through ``html.escape``; only the fixed markup around it is trusted.
"""

from __future__ import annotations

import json
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client_py._types import Interrupt, Run

_BADGE_COLOURS = {
    "QUEUED": "#6b7280",
    "RUNNING": "#2563eb",
    "PAUSED": "#d97706",
    "DONE": "#16a34a",
    "FAILED": "#dc2626",
    "CANCELLED": "#4b5563",
}


def short(text: str, limit: int = 60) -> str:
    """One line, at most ``limit`` characters, quoted so empty text stays visible."""
    flat = " ".join(text.split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return repr(flat)


def as_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def field_repr(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else repr(value)


def interrupt_repr(interrupt: Interrupt) -> str:
    parts = [f"interrupt_id={interrupt.interrupt_id!r}", f"kind={interrupt.kind!r}"]
    if interrupt.tool_name:
        parts.append(f"tool_name={interrupt.tool_name!r}")
    if interrupt.call_id:
        parts.append(f"call_id={interrupt.call_id!r}")
    if interrupt.arguments:
        parts.append(f"arguments={interrupt.arguments!r}")
    if interrupt.question:
        parts.append(f"question={interrupt.question!r}")
    if interrupt.description:
        parts.append(f"description={interrupt.description!r}")
    if interrupt.expire_time is not None:
        parts.append(f"expire_time={interrupt.expire_time.isoformat()}")
    return f"Interrupt({', '.join(parts)})"


def interrupt_line(interrupt: Interrupt) -> str:
    what = interrupt.question or interrupt.description or as_json(interrupt.arguments)
    tool = f" {interrupt.tool_name}" if interrupt.tool_name else ""
    return f"{interrupt.interrupt_id} [{interrupt.kind}]{tool}: {short(what)}"


def run_repr(run: Run) -> str:
    parts = [f"run_id={run.run_id!r}", f"state={run.state!r}"]
    if run.pause_reason:
        parts.append(f"pause_reason={run.pause_reason!r}")
    if run.interrupts:
        parts.append(f"interrupts={[i.interrupt_id for i in run.interrupts]!r}")
    if run.error is not None:
        parts.append(f"error={run.error.code!r}")
    if run.data is not None:
        parts.append(f"data={short(as_json(run.data), 40)}")
    parts += [f"turns={run.meta.turns}", f"tokens={run.meta.usage.total_tokens}", f"last_seq={run.last_seq}"]
    return f"Run({', '.join(parts)})"


def _usage_text(run: Run) -> str:
    usage = run.meta.usage
    return (
        f"turns {run.meta.turns} · tokens {usage.input_tokens} in / {usage.output_tokens} out"
        f" · ${run.meta.cost_usd:.4f}"
    )


def run_text(run: Run) -> str:
    state = run.state + (f" ({run.pause_reason})" if run.pause_reason else "")
    lines = [f"Run {run.run_id}: {state}", f"  task: {short(run.task, 100)}", f"  {_usage_text(run)}"]
    lines += [f"  pending {interrupt_line(i)}" for i in run.interrupts]
    if run.data is not None:
        lines.append(f"  data: {short(as_json(run.data), 200)}")
    if run.error is not None:
        lines.append(f"  error: {run.error}")
    return "\n".join(lines)


def _row(label: str, cell_html: str) -> str:
    return (
        f'<tr><th style="text-align:left;vertical-align:top;padding-right:1em">{escape(label)}</th>'
        f'<td style="text-align:left">{cell_html}</td></tr>'
    )


def run_html(run: Run) -> str:
    colour = _BADGE_COLOURS.get(run.state, "#6b7280")
    badge = (
        f'<span style="background:{colour};color:#fff;border-radius:4px;padding:1px 6px;'
        f'font-weight:bold">{escape(run.state)}</span>'
    )
    reason = f" {escape(run.pause_reason)}" if run.pause_reason else ""
    rows = [
        _row("run", f"<code>{escape(run.run_id)}</code> {badge}{reason}"),
        _row("task", escape(run.task)),
        _row("turns", escape(str(run.meta.turns))),
        _row(
            "usage",
            escape(
                f"{run.meta.usage.input_tokens} in / {run.meta.usage.output_tokens} out tokens"
                f" · ${run.meta.cost_usd:.4f}"
            ),
        ),
    ]
    if run.meta.model:
        rows.append(_row("model", escape(run.meta.model)))
    if run.interrupts:
        items = "".join(
            f"<li><code>{escape(i.interrupt_id)}</code> {escape(i.kind)}"
            + (f" <b>{escape(i.tool_name)}</b>" if i.tool_name else "")
            + f": {escape(i.question or i.description or as_json(i.arguments))}</li>"
            for i in run.interrupts
        )
        rows.append(_row("pending", f'<ul style="margin:0;padding-left:1.2em">{items}</ul>'))
    if run.data is not None:
        shown = run.data if isinstance(run.data, str) else json.dumps(run.data, indent=2, ensure_ascii=False)
        rows.append(_row("data", f'<pre style="margin:0;white-space:pre-wrap">{escape(shown)}</pre>'))
    if run.error is not None:
        rows.append(_row("error", f"<code>{escape(run.error.code)}</code> {escape(run.error.message)}"))
    return f'<table class="machina-run">{"".join(rows)}</table>'


def handle_html(handle_name: str, run: Run) -> str:
    return f"<div><small>{escape(handle_name)}</small>{run_html(run)}</div>"
