"""Notebook widgets for Machina runs: a live run view and an approval panel.

::

    from client_py import EngineClient
    from client_py.widgets import show

    client = EngineClient("127.0.0.1:50051")
    handle = client.create("Email Alice the forecast", ...)
    ui = show(handle)              # the run view and the approval panel, updating live
    ui.panel.cards[0].approve_button.click()   # what clicking "Approve" does

``RunView(handle)`` and ``ApprovalPanel(handle)`` can also be shown on their own. All of
them, and what ``show()`` returns, are ipywidgets boxes: they go inside ``VBox``, ``HBox``,
``Tab`` or ``Accordion`` like any widget (``VBox([RunView(a), RunView(b)])``).
After a kernel restart, ``show(client.attach(run_id))`` rebuilds the view from the
run's events (from seq 0, or ``after_seq``) with nothing lost or repeated.

These are thin compositions of stock ipywidgets over the pure-Python
``RunViewModel`` (``client_py._view``), which holds all the state and logic.
The run's events are followed by a ``Watcher`` on the sync client's own loop
thread, and the widgets are updated from there: ipywidgets sends trait changes
from any thread, and it keeps the kernel's thread free for the person's clicks.
Needs the client's ``widgets`` extra (ipywidgets) and a sync ``EngineClient``.
"""

from __future__ import annotations

import threading
from html import escape
from typing import Any

try:
    import ipywidgets as W  # type: ignore[import-untyped]
    from IPython.display import display
except ImportError as exc:  # tests/client/test_widgets.py::test_a_missing_extra_names_it
    raise ImportError(
        "client_py.widgets needs ipywidgets, which the client's `widgets` extra installs: "
        "pip install 'machina-client[widgets]' (or 'machina[widgets]' from the repository)"
    ) from exc

from client_py import _render
from client_py._sync import RunHandle
from client_py._view import CARDS, NOTES, STATUS, TEXT, TOOLS, CardModel, RunViewModel, Watcher

__all__ = ["ApprovalCard", "ApprovalPanel", "RunView", "RunWidgets", "show"]

_BUSY_NOTE = '<span style="color:#6b7280">sending the decision…</span>'


def _model_for(source: RunHandle | RunViewModel, after_seq: int) -> tuple[RunViewModel, Watcher | None]:
    """A model and (for a handle) a watcher, not yet started."""
    if isinstance(source, RunViewModel):
        return source, None
    if not isinstance(source, RunHandle):
        raise TypeError(
            "expected a RunHandle from the sync EngineClient (or a RunViewModel), "
            f"got {type(source).__name__}"
        )
    model = RunViewModel(source.run, actions=source, after_seq=after_seq)
    return model, Watcher(source, model)


class RunView(W.VBox):  # type: ignore[misc]  # ipywidgets is not annotated
    """A run as it happens: state badge, model text, tool-call log, counters, handoff, result.

    Args:
        source: a sync ``RunHandle`` (the view follows the run live) or a
            ``RunViewModel`` someone else feeds.
        after_seq: with a handle, start after this seq instead of replaying the run.
    """

    def __init__(self, source: RunHandle | RunViewModel, *, after_seq: int = 0) -> None:
        super().__init__()  # first: a widget whose __init__ fails must still close cleanly
        self.model, self.watcher = _model_for(source, after_seq)
        self.status = W.HTML()
        self.handoff = W.HTML()
        self.text = W.Output(layout=W.Layout(max_height="24em", overflow="auto", border="1px solid #e5e7eb"))
        self.tools = W.HTML()
        self.result = W.HTML()
        self.notes = W.HTML()
        self.children = (self.status, self.handoff, self.text, self.tools, self.result, self.notes)
        self._shown_text = 0
        self._unsubscribe = self.model.subscribe(self._render)
        self._ticking = threading.Event()
        if self.watcher is not None:
            self.watcher.start()
            # The elapsed time moves while nothing else does (a long tool call): redraw it.
            threading.Thread(target=self._tick, name="machina-run-view-clock", daemon=True).start()

    def __repr__(self) -> str:
        return f"RunView({self.model!r})"

    def _tick(self) -> None:
        while not self._ticking.wait(1.0) and not self.model.done:
            self.status.value = _render.view_status_html(self.model)

    def _render(self, model: RunViewModel, changed: frozenset[str]) -> None:
        if TEXT in changed and len(model.text) > self._shown_text:
            # The model's text only grows, so each update appends just the new part.
            self.text.append_stdout(model.text[self._shown_text :])
            self._shown_text = len(model.text)
        if STATUS in changed or TOOLS in changed:  # the status line names the tool running now
            self.status.value = _render.view_status_html(model)
            self.handoff.value = _render.handoff_html(model)
            self.result.value = _render.result_html(model)
        if TOOLS in changed:
            self.tools.value = _render.tool_log_html(model.tool_log)
        if NOTES in changed:
            self.notes.value = _render.notes_html(model.notes)

    def close(self) -> None:
        """Stops following the run and closes the widgets."""
        self._ticking.set()
        _close(self._unsubscribe, self.watcher, self.children)
        super().close()


class ApprovalCard(W.VBox):  # type: ignore[misc]
    """One pending interrupt: tool, arguments (editable JSON), Approve / Reject / Respond.

    The text boxes write through to the ``CardModel``; the buttons call its
    actions, which validate first and are refused while a decision is in flight.
    """

    def __init__(self, card: CardModel) -> None:
        super().__init__(layout=W.Layout(border="1px solid #d1d5db", padding="4px 8px", margin="4px 0"))
        self.model = card
        interrupt = card.interrupt
        self.title = W.HTML(_card_title(card))
        self.arguments = W.Textarea(
            value=card.arguments_text,
            description="arguments" if card.kind == "APPROVAL" else "call",
            disabled=card.kind != "APPROVAL",
            layout=W.Layout(width="98%", height=f"{min(14, 2 + card.arguments_text.count(chr(10)))}em"),
        )
        self.reason = W.Text(placeholder="why not (the model sees it)", description="reason")
        respond_hint = {
            "INPUT": "your answer",
            "TOOL_RESULT": "the tool's result",
        }.get(card.kind, "a result to return instead of running the tool")
        self.response = W.Textarea(
            placeholder=respond_hint,
            description="answer" if card.kind == "INPUT" else "respond",
            layout=W.Layout(width="98%"),
        )
        self.approve_button = W.Button(description="Approve", button_style="success", icon="check")
        self.reject_button = W.Button(description="Reject", button_style="danger", icon="times")
        self.respond_button = W.Button(
            description="Answer" if card.kind == "INPUT" else "Respond", button_style="info", icon="reply"
        )
        self.message = W.HTML()

        self.arguments.observe(self._typed("arguments_text"), names="value")
        self.reason.observe(self._typed("reason_text"), names="value")
        self.response.observe(self._typed("response_text"), names="value")
        self.approve_button.on_click(lambda _button: card.approve())
        self.reject_button.on_click(lambda _button: card.reject())
        self.respond_button.on_click(lambda _button: card.respond())

        actions = card.actions
        for action, control in (
            ("approve", self.approve_button),
            ("reject", self.reject_button),
            ("respond", self.respond_button),
        ):
            if action not in actions:
                control.layout.display = "none"
        if "reject" not in actions:
            self.reason.layout.display = "none"
        if interrupt.kind == "INPUT":
            self.arguments.layout.display = "none"
        buttons = W.HBox([self.approve_button, self.reject_button, self.respond_button])
        self.children = (self.title, self.arguments, self.reason, self.response, buttons, self.message)
        self.update()

    def __repr__(self) -> str:
        return f"ApprovalCard({self.model!r})"

    @property
    def interrupt_id(self) -> str:
        return self.model.interrupt_id

    def _typed(self, attribute: str) -> Any:
        def write_through(change: dict[str, Any]) -> None:
            setattr(self.model, attribute, change["new"])

        return write_through

    def update(self) -> None:
        """Redraws the buttons' enabled state and the card's message from its model."""
        card = self.model
        self.approve_button.disabled = not card.enabled("approve")
        self.reject_button.disabled = not card.enabled("reject")
        self.respond_button.disabled = not card.enabled("respond")
        if card.busy:
            self.message.value = _BUSY_NOTE
        elif card.message:
            self.message.value = f'<span style="color:#dc2626">{escape(card.message)}</span>'
        else:
            self.message.value = ""

    def close(self) -> None:
        for child in (
            self.title,
            self.arguments,
            self.reason,
            self.response,
            self.approve_button,
            self.reject_button,
            self.respond_button,
            self.message,
        ):
            child.close()
        super().close()


def _card_title(card: CardModel) -> str:
    interrupt = card.interrupt
    what = interrupt.question or interrupt.description
    kind = {"APPROVAL": "needs approval", "TOOL_RESULT": "needs a result", "INPUT": "asks"}.get(
        card.kind, card.kind
    )
    tool = f"<b>{escape(interrupt.tool_name)}</b> " if interrupt.tool_name else ""
    tool = _render.agent_html(interrupt.agent_path) + tool
    detail = f"<div>{escape(what)}</div>" if what else ""
    return (
        f'<div class="machina-card">{tool}{escape(kind)} '
        f"<small><code>{escape(interrupt.interrupt_id)}</code></small>{detail}</div>"
    )


class ApprovalPanel(W.VBox):  # type: ignore[misc]
    """One ``ApprovalCard`` per pending interrupt, updated live as the run moves on.

    ``cards`` lists the cards now shown, in the run's order; a card goes away once
    its interrupt is decided (here or by anyone else) and new ones appear when the
    run pauses again.
    """

    def __init__(self, source: RunHandle | RunViewModel, *, after_seq: int = 0) -> None:
        super().__init__()
        self.model, self.watcher = _model_for(source, after_seq)
        self.status = W.HTML()
        self.box = W.VBox()
        self.cards: list[ApprovalCard] = []
        self.children = (self.status, self.box)
        self._unsubscribe = self.model.subscribe(self._render)
        if self.watcher is not None:
            self.watcher.start()

    def __repr__(self) -> str:
        return f"ApprovalPanel({self.model!r}, cards={[c.interrupt_id for c in self.cards]!r})"

    def card(self, interrupt_id: str) -> ApprovalCard:
        for card in self.cards:
            if card.interrupt_id == interrupt_id:
                return card
        raise KeyError(interrupt_id)

    def _render(self, model: RunViewModel, changed: frozenset[str]) -> None:
        if CARDS in changed:
            shown = {card.model: card for card in self.cards}
            cards = [shown.pop(card) if card in shown else ApprovalCard(card) for card in model.cards]
            for gone in shown.values():
                gone.close()
            if [c.model for c in cards] != [c.model for c in self.cards]:
                self.cards = cards
                self.box.children = tuple(cards)
        if CARDS in changed or STATUS in changed:
            for card in self.cards:
                card.update()
            self.status.value = _panel_status(model)

    def close(self) -> None:
        """Stops following the run and closes the widgets."""
        for card in self.cards:
            card.close()
        _close(self._unsubscribe, self.watcher, self.children)
        super().close()


def _panel_status(model: RunViewModel) -> str:
    badge = _render.badge_html(model.state)
    if model.cards:
        count = len(model.cards)
        text = f"{count} decision{'s' if count != 1 else ''} pending"
    elif model.done:
        text = "the run has ended; nothing to decide"
    elif model.paused:
        text = f"paused ({model.pause_reason or '?'}); nothing for you to decide"
    else:
        text = "nothing to decide right now"
    return f'<div class="machina-panel-status">{badge} {escape(text)}</div>'


class RunWidgets(W.VBox):  # type: ignore[misc]
    """A ``RunView`` and an ``ApprovalPanel`` over one model, fed by one watcher."""

    def __init__(self, handle: RunHandle, *, after_seq: int = 0) -> None:
        super().__init__()
        self.model, watcher = _model_for(handle, after_seq)
        assert watcher is not None
        self.watcher = watcher
        self.view = RunView(self.model)
        self.panel = ApprovalPanel(self.model)
        self.children = (self.view, self.panel)
        self.watcher.start()

    def __repr__(self) -> str:
        return f"RunWidgets({self.model!r})"

    def close(self) -> None:
        """Stops following the run and closes the widgets."""
        self.watcher.stop()
        self.view.close()
        self.panel.close()
        super().close()


def show(handle: RunHandle, *, after_seq: int = 0) -> RunWidgets:
    """Displays the live run view and approval panel of a run; returns them.

    ``handle`` comes from the sync ``EngineClient`` (``create`` or ``attach``).
    """
    widgets = RunWidgets(handle, after_seq=after_seq)
    display(widgets)  # type: ignore[no-untyped-call]  # IPython's display is not annotated
    return widgets


def _close(unsubscribe: Any, watcher: Watcher | None, children: Any) -> None:
    unsubscribe()
    if watcher is not None:
        watcher.stop()
    for child in children:
        child.close()
