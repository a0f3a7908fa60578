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
    from client_py._types import Interrupt, Run, Thread
    from client_py._view import RunViewModel, ToolLogEntry

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


def clip(text: str, limit: int = 80) -> str:
    """One line of at most ``limit`` characters, unquoted (for tables)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


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
    where = f" (subagent {interrupt.agent_path})" if interrupt.agent_path else ""
    return f"{interrupt.interrupt_id} [{interrupt.kind}]{tool}{where}: {short(what)}"


def run_repr(run: Run) -> str:
    parts = [f"run_id={run.run_id!r}", f"state={str(run.state)!r}"]
    if run.pause_reason:
        parts.append(f"pause_reason={str(run.pause_reason)!r}")
    if run.interrupts:
        parts.append(f"interrupts={[i.interrupt_id for i in run.interrupts]!r}")
    if run.error is not None:
        parts.append(f"error={run.error.code!r}")
    if run.data is not None:
        parts.append(f"data={short(as_json(run.data), 40)}")
    parts += [f"turns={run.meta.turns}", f"tokens={run.meta.usage.total_tokens}", f"last_seq={run.last_seq}"]
    return f"Run({', '.join(parts)})"


def counters_text(turns: int, input_tokens: int, output_tokens: int, cost_usd: float) -> str:
    return f"turns {turns} · tokens {input_tokens} in / {output_tokens} out · ${cost_usd:.4f}"


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def progress_text(model: RunViewModel, elapsed: float) -> str:
    """``RUNNING · turns 3 · tokens 812 in / 96 out · $0.0042 · 4.2 s · ⚙ Bash``."""
    state = model.state + (f" ({model.pause_reason})" if model.pause_reason else "")
    return f"{state} · {progress_details(model, elapsed)}"


def progress_details(model: RunViewModel, elapsed: float) -> str:
    """The counters, the elapsed time and the tools running now."""
    parts = [model.counters_text(), duration_text(elapsed)]
    running = model.running_tools
    if running and not model.done:
        parts.append("⚙ " + ", ".join(running))
    return " · ".join(parts)


def _pretty(data: Any) -> str:
    """A run's result for a <pre>: text as it is, other JSON values indented."""
    return data if isinstance(data, str) else json.dumps(data, indent=2, ensure_ascii=False)


def run_text(run: Run) -> str:
    state = run.state + (f" ({run.pause_reason})" if run.pause_reason else "")
    meta = run.meta
    counters = counters_text(meta.turns, meta.usage.input_tokens, meta.usage.output_tokens, meta.cost_usd)
    lines = [f"Run {run.run_id}: {state}", f"  task: {short(run.task, 100)}", f"  {counters}"]
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


def badge_html(state: str) -> str:
    """A run state as a coloured badge."""
    colour = _BADGE_COLOURS.get(state, "#6b7280")
    return (
        f'<span class="machina-state" style="background:{colour};color:#fff;border-radius:4px;'
        f'padding:1px 6px;font-weight:bold">{escape(state)}</span>'
    )


def run_html(run: Run) -> str:
    badge = badge_html(run.state)
    reason = f" {escape(run.pause_reason)}" if run.pause_reason else ""
    rows = [
        _row("run", f"<code>{escape(run.run_id)}</code> {badge}{reason}"),
        _row("task", escape(run.task)),
        *_thread_rows(run),
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
        rows.append(
            _row("data", f'<pre style="margin:0;white-space:pre-wrap">{escape(_pretty(run.data))}</pre>')
        )
    if run.error is not None:
        rows.append(_row("error", f"<code>{escape(run.error.code)}</code> {escape(run.error.message)}"))
    return f'<table class="machina-run">{"".join(rows)}</table>'


def _thread_rows(run: Run) -> list[str]:
    """A run that continues a thread names it (a run of its own thread does not)."""
    if not run.thread_id or run.thread_id == run.run_id:
        return []
    return [_row("thread", f"<code>{escape(run.thread_id)}</code>")]


def thread_html(thread: Thread) -> str:
    """A thread: its runs in order, the active one marked, and where it was forked from."""
    items = "".join(
        f"<li><code>{escape(run_id)}</code>"
        + (" " + badge_html("RUNNING") if run_id == thread.active_run_id else "")
        + "</li>"
        for run_id in thread.run_ids
    )
    rows = [
        _row("thread", f"<code>{escape(thread.thread_id)}</code>"),
        _row("runs", f'<ol style="margin:0;padding-left:1.2em">{items}</ol>'),
    ]
    if thread.forked_from:
        point = thread.forked_from
        where = (
            f" turn {point['turn']}"
            if point.get("turn")
            else f" seq {point['seq']}"
            if point.get("seq")
            else ""
        )
        rows.append(_row("forked from", f"<code>{escape(point['run_id'])}</code>{escape(where)}"))
    if thread.labels:
        rows.append(_row("labels", escape(", ".join(f"{k}={v}" for k, v in sorted(thread.labels.items())))))
    return f'<table class="machina-thread">{"".join(rows)}</table>'


def handle_html(handle_name: str, run: Run) -> str:
    return f"<div><small>{escape(handle_name)}</small>{run_html(run)}</div>"


# --- the notebook view (client_py._view / client_py.widgets) ------------------------

_STATUS_COLOURS = {"ok": "#16a34a", "error": "#dc2626", "rejected": "#dc2626", "running": "#2563eb"}


def view_status_html(model: RunViewModel) -> str:
    """The view's header: state badge, run id, counters, and whether it is live."""
    reason = f" {escape(model.pause_reason)}" if model.pause_reason else ""
    live = ' <small style="color:#16a34a">● live</small>' if model.watching else ""
    problem = f'<div style="color:#dc2626">{escape(model.watch_error)}</div>' if model.watch_error else ""
    thread = f" <small>in thread <code>{escape(model.thread_id)}</code></small>" if model.thread_id else ""
    return (
        f'<div class="machina-status">{badge_html(model.state)}{reason} <code>{escape(model.run_id)}</code>'
        f"{thread} <small>{escape(progress_details(model, model.elapsed()))}</small>{live}{problem}</div>"
    )


def handoff_html(model: RunViewModel) -> str:
    if not model.handoff_tools:
        return ""
    tools = ", ".join(f"<b>{escape(t)}</b>" for t in model.handoff_tools)
    return f'<div class="machina-handoff">⇢ handed off to the runner for {tools}</div>'


def agent_html(path: str) -> str:
    """Which subagent a call or an interrupt is from, shown before it ("" for the run's own)."""
    return f"<small><code>{escape(path)}</code></small> " if path else ""


def tool_log_html(entries: list[ToolLogEntry]) -> str:
    if not entries:
        return '<div class="machina-tools"><small>no tool calls yet</small></div>'
    rows = []
    for entry in entries:
        colour = _STATUS_COLOURS.get(entry.status, "#d97706")
        status = entry.status
        if entry.decision and entry.decision != status:
            status += f" · {entry.decision}"
        if entry.decided_by:
            status += f" by {entry.decided_by}"
        if entry.status in ("ok", "error"):
            status += f" · {entry.duration_ms} ms"
        rows.append(
            f"<tr><td>{agent_html(entry.agent_path)}<b>{escape(entry.tool_name)}</b></td>"
            f"<td><code>{escape(clip(as_json(entry.arguments)))}</code></td>"
            f'<td style="color:{colour}">{escape(status)}</td>'
            f"<td>{escape(clip(entry.output))}</td></tr>"
        )
    return f'<table class="machina-tools">{"".join(rows)}</table>'


def result_html(model: RunViewModel) -> str:
    if model.error is not None:
        return (
            f'<div class="machina-result" style="color:#dc2626"><code>{escape(model.error.code)}</code> '
            f"{escape(model.error.message)}</div>"
        )
    if model.state != "DONE" or model.data is None:
        return ""
    pre = f'<pre style="white-space:pre-wrap">{escape(_pretty(model.data))}</pre>'
    return f'<div class="machina-result"><b>result</b>{pre}</div>'


def notes_html(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{escape(note)}</li>" for note in notes)
    return f'<ol class="machina-notes" style="margin:0;font-size:smaller">{items}</ol>'


def view_html(model: RunViewModel) -> str:
    """The whole view as static HTML (no buttons): for pages and frontends without widgets."""
    text = (
        f'<pre class="machina-text" style="white-space:pre-wrap">{escape(model.text)}</pre>'
        if model.text
        else ""
    )
    pending = ""
    if model.cards:
        items = "".join(f"<li>{escape(interrupt_line(card.interrupt))}</li>" for card in model.cards)
        pending = f'<div class="machina-pending"><b>pending</b><ul>{items}</ul></div>'
    parts = [
        view_status_html(model),
        handoff_html(model),
        text,
        tool_log_html(model.tool_log),
        pending,
        result_html(model),
        notes_html(model.notes),
    ]
    return f'<div class="machina-view">{"".join(parts)}</div>'
