"""The per-turn benchmark's script, shared by both sides of the comparison (stdlib only: the
LangGraph process imports it and nothing of the engine).

A run of N turns: turn 1 writes ``notes.txt`` (``v0``), each later turn but the last edits it
(``v{k-1}`` → ``v{k}``: a file changed by a tool that is not idempotent, so the engine
commits a checkpoint before each call), and the last turn answers ``done``. A 1-turn run only answers; its
time is what creating and finishing a run costs, which per-turn growth leaves out.
"""

from __future__ import annotations

from typing import Any

FILE = "notes.txt"
Turn = tuple[str, list[tuple[str, dict[str, Any]]]]


def edit_script(turns: int) -> list[Turn]:
    script: list[Turn] = []
    for k in range(1, turns):
        if k == 1:
            script.append(("step", [("Write", {"path": FILE, "content": "v0"})]))
        else:
            edit = {"path": FILE, "old_string": f"v{k - 2}", "new_string": f"v{k - 1}"}
            script.append(("step", [("Edit", edit)]))
    return [*script, ("done", [])]
