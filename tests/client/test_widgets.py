"""The notebook widgets, headless, against a real engine process; buttons are pressed with ``.click()``.

The engine is ``python -m engine_service --config demo/engine.toml`` (``get_weather``,
and ``send_email`` which needs approval); the client is the sync ``EngineClient``
a notebook uses, called from the test's thread while the widgets' watcher feeds
them from the client's loop thread.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from client_py import AsyncEngineClient, EngineClient, Run, RunHandle
from client_py._view import RunViewModel, Watcher
from client_py.widgets import ApprovalPanel, RunView, RunWidgets
from tests.conftest import ROOT, turn
from tests.processes import EngineProcess, RunnerProcess

DEMO_CONFIG = str(ROOT / "demo" / "engine.toml")
EMAIL = {"to": "alice@example.com", "subject": "Weather", "body": "Sunny in Paris."}
WEATHER_THEN_EMAIL = [
    turn("Checking the weather.", ("get_weather", {"city": "Paris"})),
    turn("Emailing Alice.", ("send_email", EMAIL)),
    turn("Done: Alice knows."),
]
TWO_EMAILS = [
    turn("Two emails.", ("send_email", EMAIL), ("send_email", {**EMAIL, "to": "bob@example.com"})),
    turn("Both handled."),
]
WAIT = 20.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    tmp = tmp_path_factory.mktemp("widgets-engine")
    process = EngineProcess(
        tmp, "--config", DEMO_CONFIG, "--storage", str(tmp / "storage"),
        env={"MACHINA_WORKDIR_ROOT": str(tmp / "workdirs")},
    )  # fmt: skip
    try:
        yield process
    finally:
        process.stop()
        process.close()


@pytest.fixture
def client(engine: EngineProcess) -> Iterator[EngineClient]:
    with EngineClient(engine.target) as sync_client:
        yield sync_client


@pytest.fixture
def opened(client: EngineClient) -> Iterator[list[Any]]:
    """Widgets to close (and watchers to stop) before the client closes."""
    shown: list[Any] = []
    yield shown
    for widgets in shown:
        widgets.close()


def start(
    client: EngineClient, opened: list[Any], script: list[dict[str, Any]]
) -> tuple[RunHandle, RunWidgets]:
    handle = client.create("Email Alice today's weather", model="scripted", script=script)
    ui = RunWidgets(handle)
    opened.append(ui)
    return handle, ui


def wait_cards(ui: RunWidgets | ApprovalPanel, count: int) -> None:
    assert ui.model.wait_for(lambda m: len(m.cards) == count and m.paused, WAIT), ui.model


def finish(handle: RunHandle, ui: RunWidgets | RunView) -> Run:
    run = handle.wait(timeout=WAIT)
    assert run.state == "DONE", run
    assert ui.watcher is not None
    assert ui.watcher.join(WAIT)
    return run


def kinds(handle: RunHandle) -> list[str]:
    return [event.kind for event in handle.events(follow=False)]


def text_of(view: RunView) -> str:
    return "".join(output["text"] for output in view.text.outputs)


@pytest.mark.slow
def test_approve_from_the_panel_and_watch_the_run_finish(client: EngineClient, opened: list[Any]) -> None:
    handle, ui = start(client, opened, WEATHER_THEN_EMAIL)
    wait_cards(ui, 1)
    (card,) = ui.panel.cards
    assert "PAUSED" in ui.view.status.value
    assert "AWAITING_APPROVAL" in ui.view.status.value
    assert "<b>send_email</b> needs approval" in card.title.value
    assert json.loads(card.arguments.value) == EMAIL
    assert "1 decision pending" in ui.panel.status.value
    assert not card.approve_button.disabled
    assert not card.reject_button.disabled

    card.approve_button.click()

    run = finish(handle, ui)
    assert run.data == "Done: Alice knows."
    assert ui.panel.cards == []
    assert ui.panel.box.children == ()
    assert "the run has ended" in ui.panel.status.value
    assert "DONE" in ui.view.status.value
    assert "turns 3" in ui.view.status.value
    assert text_of(ui.view) == "Checking the weather.\n\nEmailing Alice.\n\nDone: Alice knows."
    assert "approved by" in ui.view.tools.value
    assert "queued message" in ui.view.tools.value
    assert "Done: Alice knows." in ui.view.result.value
    assert [(e.tool_name, e.status) for e in ui.model.tool_log] == [
        ("get_weather", "ok"),
        ("send_email", "ok"),
    ]


@pytest.mark.slow
def test_edited_arguments_are_validated_in_the_card_then_approved(
    client: EngineClient, opened: list[Any]
) -> None:
    handle, ui = start(client, opened, WEATHER_THEN_EMAIL)
    wait_cards(ui, 1)
    card = ui.panel.cards[0]
    before = handle.refresh().last_seq

    card.arguments.value = '{"to": "carol@example.com", '  # not JSON
    card.approve_button.click()
    assert "not valid JSON" in card.message.value
    card.arguments.value = json.dumps({"to": ["carol@example.com"], "subject": "Weather"})
    card.approve_button.click()
    assert "missing required key &#x27;body&#x27;" in card.message.value
    assert "$.to: expected string, got array" in card.message.value
    after = handle.refresh()
    assert after.state == "PAUSED"
    assert after.last_seq == before
    assert ui.panel.cards == [card]
    assert not card.approve_button.disabled

    card.arguments.value = json.dumps({**EMAIL, "to": "carol@example.com"})
    card.approve_button.click()
    assert card.model.decision == "approve_with_edits"
    assert card.model.message == ""
    assert ui.model.wait_for(lambda m: not m.cards, WAIT)
    assert ui.panel.cards == []

    finish(handle, ui)
    email = ui.model.tool_log[1]
    assert email.arguments["to"] == "carol@example.com"
    assert email.decision == "approved with edits"
    assert email.output.endswith("to carol@example.com")


@pytest.mark.slow
def test_reject_with_a_reason(client: EngineClient, opened: list[Any]) -> None:
    handle, ui = start(client, opened, WEATHER_THEN_EMAIL)
    wait_cards(ui, 1)
    card = ui.panel.cards[0]
    card.reject_button.click()
    assert "Give a reason" in card.message.value
    card.reason.value = "Alice is on holiday"
    card.reject_button.click()

    finish(handle, ui)
    decided = [e for e in handle.events(follow=False) if e.kind == "approval_decided"]
    assert [(e.decision, e.reason) for e in decided] == [("reject", "Alice is on holiday")]  # type: ignore[attr-defined]
    assert "tool_call_started" not in kinds(handle)[kinds(handle).index("approval_decided") :]
    assert ui.model.tool_log[1].status == "rejected"
    assert "rejected" in ui.view.tools.value
    assert "Alice is on holiday" in ui.view.tools.value


@pytest.mark.slow
def test_respond_instead_of_running_the_tool(client: EngineClient, opened: list[Any]) -> None:
    handle, ui = start(client, opened, WEATHER_THEN_EMAIL)
    wait_cards(ui, 1)
    card = ui.panel.cards[0]
    card.respond_button.click()
    assert "Write the result to return first." in card.message.value
    card.response.value = "I phoned Alice instead."
    card.respond_button.click()

    finish(handle, ui)
    decided = [e for e in handle.events(follow=False) if e.kind == "approval_decided"]
    assert [e.decision for e in decided] == ["respond"]  # type: ignore[attr-defined]
    started = [e.call.tool_name for e in handle.events(follow=False) if e.kind == "tool_call_started"]  # type: ignore[attr-defined]
    assert started == ["get_weather"]  # send_email never ran
    assert ui.model.tool_log[1].status == "responded"


@pytest.mark.slow
def test_two_interrupts_at_once(client: EngineClient, opened: list[Any]) -> None:
    handle, ui = start(client, opened, TWO_EMAILS)
    wait_cards(ui, 2)
    alice, bob = ui.panel.cards
    assert json.loads(bob.arguments.value)["to"] == "bob@example.com"
    assert "2 decisions pending" in ui.panel.status.value

    alice.approve_button.click()
    assert ui.model.wait_for(lambda m: len(m.cards) == 1, WAIT)
    assert ui.panel.cards == [bob]
    assert handle.refresh().state == "PAUSED"  # still waiting for Bob's
    assert "1 decision pending" in ui.panel.status.value

    bob.reason.value = "not Bob"
    bob.reject_button.click()
    run = finish(handle, ui)
    assert run.data == "Both handled."
    assert [(e.tool_name, e.status) for e in ui.model.tool_log] == [
        ("send_email", "ok"),
        ("send_email", "rejected"),
    ]


@pytest.mark.slow
def test_a_question_is_answered_from_its_card(client: EngineClient, opened: list[Any]) -> None:
    script = [turn("Let me ask.", ("AskUser", {"question": "Which colour?"})), turn("Blue it is.")]
    handle, ui = start(client, opened, script)
    wait_cards(ui, 1)
    card = ui.panel.cards[0]
    assert card.model.kind == "INPUT"
    assert "Which colour?" in card.title.value
    assert card.approve_button.layout.display == "none"
    assert card.reject_button.layout.display == "none"
    assert card.respond_button.description == "Answer"
    card.response.value = "Blue"
    card.respond_button.click()
    finish(handle, ui)
    assert ui.model.tool_log[0].status == "responded"


class GatedHandle:
    """The real handle's decisions, held at a gate so the test can look at the card in flight."""

    def __init__(self, handle: RunHandle) -> None:
        self.handle = handle
        self.gate = threading.Event()
        self.entered = threading.Event()

    def approve(self, interrupt_id: str, edits: Mapping[str, Any] | None = None) -> Run:
        self.entered.set()
        assert self.gate.wait(WAIT)
        return self.handle.approve(interrupt_id, edits)

    def reject(self, interrupt_id: str, reason: str = "") -> Run:
        return self.handle.reject(interrupt_id, reason)

    def respond(self, interrupt_id: str, output: Any) -> Run:
        return self.handle.respond(interrupt_id, output)


@pytest.mark.slow
def test_buttons_are_disabled_while_the_decision_is_in_flight(client: EngineClient) -> None:
    handle = client.create("two emails", model="scripted", script=TWO_EMAILS)
    gated = GatedHandle(handle)
    model = RunViewModel(handle.run, actions=gated)
    panel = ApprovalPanel(model)
    watcher = Watcher(handle, model).start()
    try:
        wait_cards(panel, 2)
        card, other = panel.cards
        clicker = threading.Thread(target=card.approve_button.click)
        clicker.start()
        assert gated.entered.wait(WAIT)
        assert card.approve_button.disabled
        assert card.reject_button.disabled
        assert card.respond_button.disabled
        assert "sending the decision" in card.message.value
        assert not other.approve_button.disabled  # the other card stays usable
        card.approve_button.click()  # a second click while in flight sends nothing
        gated.gate.set()
        clicker.join(WAIT)
        assert model.wait_for(lambda m: [c.interrupt_id for c in m.cards] == [other.interrupt_id], WAIT)
        assert panel.cards == [other]
        decided = [e for e in handle.events(follow=False) if e.kind == "approval_decided"]
        assert len(decided) == 1
        other.approve_button.click()
        assert handle.wait(timeout=WAIT).state == "DONE"
        assert watcher.join(WAIT)
    finally:
        watcher.stop()
        panel.close()


@pytest.mark.slow
def test_reattach_after_a_restart_replays_without_duplicates(
    engine: EngineProcess, client: EngineClient, opened: list[Any]
) -> None:
    handle, ui = start(client, opened, WEATHER_THEN_EMAIL)
    wait_cards(ui, 1)
    ui.panel.cards[0].approve_button.click()
    finish(handle, ui)
    paused_at = next(e.seq for e in handle.events(follow=False) if e.kind == "paused")

    # A new kernel: a new client, attached by run id, a view rebuilt from the stored events.
    with EngineClient(engine.target) as fresh:
        attached = fresh.attach(handle.run_id)
        view = RunView(attached)
        later = RunView(fresh.attach(handle.run_id), after_seq=paused_at)
        try:
            assert view.watcher is not None
            assert view.watcher.join(WAIT)
            assert later.watcher is not None
            assert later.watcher.join(WAIT)
            assert text_of(view) == text_of(ui.view)
            assert view.model.tool_log == ui.model.tool_log
            assert view.model.notes == ui.model.notes
            assert view.model.counters_text() == ui.model.counters_text()
            assert view.model.last_seq == handle.run.last_seq
            assert text_of(later) == "Done: Alice knows."
            assert [e.tool_name for e in later.model.tool_log] == ["send_email"]
        finally:
            view.close()
            later.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_handoff_to_the_runner_is_shown(tmp_path: Path) -> None:
    shared = {
        "MACHINA_STORAGE": str(tmp_path / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp_path / "workdirs"),
        "MACHINA_RUNNER_SECRET": "widgets-runner-secret-3f1a",
    }
    runner = RunnerProcess(tmp_path / "runner", env=shared)
    engine = EngineProcess(
        tmp_path / "engine",
        env={
            **shared,
            "MACHINA_CAPABILITIES_SUBPROCESS": "false",
            "MACHINA_RUNNER_URL": f"{runner.http}/continue",
        },
    )
    try:
        with EngineClient(engine.target) as sync_client:
            script = [turn("Running it.", ("Bash", {"command": "echo from-the-runner"})), turn("It ran.")]
            handle = sync_client.create("run a command", model="scripted", script=script)
            view = RunView(handle)
            try:
                # wait() also returns at the HANDOFF_TO_RUNNER pause; the watcher ends with the run.
                assert view.watcher is not None
                assert view.watcher.join(WAIT)
                assert view.model.state == "DONE"
                assert handle.refresh().state == "DONE"
                assert "handed off to the runner for <b>Bash</b>" in view.handoff.value
                assert "handed off to the runner for Bash" in view.model.notes
                assert "resumed by runner" in view.model.notes
                assert "from-the-runner" in view.model.tool_log[0].output
            finally:
                view.close()
    finally:
        engine.close()
        runner.close()


def test_widgets_need_a_sync_handle() -> None:
    async_client = AsyncEngineClient("127.0.0.1:1")
    with pytest.raises(TypeError, match="RunHandle from the sync EngineClient"):
        RunView(async_client)  # type: ignore[arg-type]


def test_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "client_py.widgets")
    with pytest.raises(
        ImportError, match=r"`widgets` extra installs: pip install 'machina-client\[widgets\]'"
    ):
        importlib.import_module("client_py.widgets")


@pytest.mark.slow
def test_the_view_model_does_not_import_ipywidgets() -> None:
    code = "import sys, client_py._view; assert 'ipywidgets' not in sys.modules, 'imported'"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
