"""Structured logs: JSON lines when stderr is not a terminal, readable text when it is."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else was passed with ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(fmt: str = "auto", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Keep third-party chatter (e.g. httpx request lines) at warning level.
    for noisy in ("httpx", "httpcore", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_transitions = logging.getLogger("machina.runs")


def run_transition(
    transition: str, run_id: str, workspace: str, *, trace_id: str = "", message: str = "", **fields: Any
) -> None:
    """One structured line for a run's transition (created, paused, decided, resumed, handed_off,
    recovered, done, failed, cancelled), with ``run_id``, ``workspace`` and ``trace_id``.

    ``fields`` say what the transition needs (a pause's reason and interrupt ids, who decided,
    an error code); never arguments, answers or anything a tenant typed.
    """
    if not _transitions.isEnabledFor(logging.INFO):
        return
    extra = {"transition": transition, "run_id": run_id, "workspace": workspace, "trace_id": trace_id}
    extra.update(fields)
    detail = " ".join(f"{k}={v}" for k, v in fields.items() if v not in ("", None, [], ()))
    _transitions.info(
        "run %s %s%s%s", run_id, transition, f" {detail}" if detail else "", f" {message}" if message else "",
        extra=extra,
    )  # fmt: skip
