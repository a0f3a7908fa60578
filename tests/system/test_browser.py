"""A real browser approves a paused run: Debian's chromium, driven by Playwright.

A widget exported as static HTML cannot call back into Python, so the test serves
a tiny page on 127.0.0.1 instead: it renders the approval panel's view model
(state, text, tool log) and one HTML form per card, and a click posts back to a
handler that presses the SAME widget button (``card.approve_button.click()``)
after copying what was typed in the browser into the card. Clicking "Approve" in
the browser is what makes the engine's run finish.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import ipywidgets as W  # type: ignore[import-untyped]
import pytest

from client_py import EngineClient
from client_py.widgets import ApprovalCard, ApprovalPanel, RunView
from tests.conftest import ROOT, turn
from tests.processes import EngineProcess

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
SCRIPT = [
    turn("Checking the weather.", ("get_weather", {"city": "Paris"})),
    turn(
        "Emailing Alice.",
        ("send_email", {"to": "alice@example.com", "subject": "Weather", "body": "Sunny in Paris."}),
    ),
    turn("Done: Alice knows."),
]


def _page(panel: ApprovalPanel) -> str:
    model = panel.model
    forms = []
    for card in panel.cards:
        buttons = "".join(
            f'<button type="submit" name="action" value="{action}">{action.capitalize()}</button>'
            for action in card.model.actions
        )
        forms.append(
            f'<form class="card" method="post" action="/decide">{card.title.value}'
            f'<input type="hidden" name="interrupt_id" value="{escape(card.interrupt_id)}">'
            f'<textarea name="arguments" rows="6" cols="70">{escape(card.arguments.value)}</textarea><br>'
            f'<input name="reason" placeholder="reason" value="{escape(card.reason.value)}">'
            f'<input name="response" placeholder="respond" value="{escape(card.response.value)}">'
            f'{buttons}<div class="message">{card.message.value}</div></form>'
        )
    # While the run moves on by itself, the page follows it; with a card shown it holds still.
    follow = "" if model.cards or model.done else "<script>setTimeout(() => location.reload(), 200)</script>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Machina approvals</title>"
        "<style>body{font-family:sans-serif;margin:1.5em} .card{border:1px solid #ccc;padding:.6em;"
        "margin:.6em 0} .message{color:#dc2626} td{padding:0 .6em}</style></head><body>"
        f"<h2>Run</h2>{model._repr_html_()}<h2>Pending decisions</h2>{''.join(forms) or '<p>none</p>'}"
        f"{follow}</body></html>"
    )


def _decide(panel: ApprovalPanel, form: dict[str, str]) -> None:
    card: ApprovalCard = panel.card(form["interrupt_id"])
    # What the person typed in the browser goes into the widget, as typing in Jupyter would.
    card.arguments.value = form.get("arguments", card.arguments.value)
    card.reason.value = form.get("reason", "")
    card.response.value = form.get("response", "")
    button = {"approve": card.approve_button, "reject": card.reject_button, "respond": card.respond_button}
    button[form["action"]].click()


def _serve(panel: ApprovalPanel) -> tuple[ThreadingHTTPServer, Callable[[], None]]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes = b"", location: str = "") -> None:
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path != "/":
                self._send(404)
                return
            self._send(200, _page(panel).encode())

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            fields = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
            _decide(panel, {key: values[0] for key, values in fields.items()})
            self._send(303, location="/")

        def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="approval-page", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return server, stop


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineProcess]:
    process = EngineProcess(
        tmp_path, "--config", str(ROOT / "demo" / "engine.toml"), "--storage", str(tmp_path / "storage"),
        env={"MACHINA_WORKDIR_ROOT": str(tmp_path / "workdirs")},
    )  # fmt: skip
    try:
        yield process
    finally:
        process.stop()
        process.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_approve_in_a_real_browser_finishes_the_run(engine: EngineProcess) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing under CI: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the browser test needs it")
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with EngineClient(engine.target) as client:
        handle = client.create("Email Alice today's weather", model="scripted", script=SCRIPT)
        # The panel as a person composes it, inside a tab beside the run's view.
        ui = W.Tab(children=[W.VBox([RunView(handle), ApprovalPanel(handle)])])
        panel = ui.children[0].children[1]
        assert isinstance(panel, ApprovalPanel)
        server, stop = _serve(panel)
        try:
            assert panel.model.wait_for(lambda m: len(m.cards) == 1, 20)
            url = f"http://127.0.0.1:{server.server_address[1]}/"
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM),
                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
                )
                try:
                    page = browser.new_page(viewport={"width": 1000, "height": 800})
                    page.goto(url)
                    expect(page.locator(".machina-state").first).to_have_text("PAUSED")
                    card = page.locator("form.card")
                    expect(card).to_have_count(1)
                    expect(card).to_contain_text("send_email")

                    # A broken edit typed in the browser is refused by the card, and nothing is sent.
                    card.locator("textarea").fill('{"to": 42}')
                    card.get_by_role("button", name="Approve").click()
                    expect(page.locator(".message")).to_contain_text("missing required key")
                    assert handle.refresh().state == "PAUSED"
                    page.screenshot(path=str(ARTIFACTS / "approval-pending.png"), full_page=True)

                    edited = '{"to": "alice@example.com", "subject": "Paris", "body": "Sunny, 21°C."}'
                    page.locator("form.card textarea").fill(edited)
                    page.get_by_role("button", name="Approve").click()

                    # The page follows the run until it is done.
                    expect(page.locator(".machina-state").first).to_have_text("DONE", timeout=20_000)
                    expect(page.locator("body")).to_contain_text("Done: Alice knows.")
                    expect(page.locator(".machina-tools")).to_contain_text("approved with edits")
                    expect(page.locator("form.card")).to_have_count(0)
                    page.screenshot(path=str(ARTIFACTS / "approval.png"), full_page=True)
                finally:
                    browser.close()
            run = handle.wait(timeout=20)
            assert run.state == "DONE"
            assert run.data == "Done: Alice knows."
            started = [e.call for e in handle.events(follow=False) if e.kind == "tool_call_started"]  # type: ignore[attr-defined]
            assert [(c.tool_name, c.arguments.get("subject")) for c in started] == [
                ("get_weather", None),
                ("send_email", "Paris"),
            ]
        finally:
            stop()
            for widget in ui.children[0].children:
                widget.close()
            ui.close()
