"""The notebooks run top to bottom in a real Jupyter kernel against a real engine process.

The kernel is this venv's Python with ipykernel, through a kernel spec written
into a temporary ``JUPYTER_PATH`` (so it works on a fresh machine and never
picks up some other ``python3`` kernel installed for the user). The engine is
``python -m engine_service --config demo/engine.toml``; its address reaches the
notebooks as ``MACHINA_TARGET``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT
from tests.processes import EngineProcess

NOTEBOOKS = ROOT / "notebooks"
KERNEL = "machina-test-venv"


def _committed_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.rglob("*.ipynb"))


@pytest.mark.parametrize("path", _committed_notebooks(), ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs(path: Path) -> None:
    """Notebooks are committed stripped: no outputs, no execution counts, no widget state."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"
    )
    assert "widgets" not in notebook.metadata, f"{path.name} carries saved widget state"


def test_both_notebooks_exist() -> None:
    assert {p.name for p in _committed_notebooks()} >= {"quickstart.ipynb", "approvals.ipynb"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    tmp = tmp_path_factory.mktemp("notebook-engine")
    process = EngineProcess(
        tmp,
        "--config",
        str(ROOT / "demo" / "engine.toml"),
        "--storage",
        str(tmp / "storage"),
        env={"MACHINA_WORKDIR_ROOT": str(tmp / "workdirs")},
    )
    try:
        yield process
    finally:
        process.stop()
        process.close()


@pytest.fixture
def kernel_env(kernel_spec: str, engine: EngineProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernel, told where the engine is (``MACHINA_TARGET``)."""
    monkeypatch.setenv("MACHINA_TARGET", engine.target)
    return kernel_spec


@pytest.fixture
def kernel_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec for this venv's Python, and the environment the kernel starts with."""
    monkeypatch.delenv("MACHINA_TARGET", raising=False)
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Machina test venv",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # Keep the kernel's runtime files and IPython profile out of the user's home.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    # debugpy (inside ipykernel) warns on stderr about frozen modules otherwise.
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return KERNEL


def _execute(name: str | Any, kernel: str) -> Any:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4) if isinstance(name, str) else name
    client = NotebookClient(
        notebook,
        kernel_name=kernel,
        timeout=60,
        startup_timeout=60,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return notebook


def _text(notebook: Any) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            elif "data" in output:
                parts.append(output["data"].get("text/plain", ""))
    return "\n".join(parts)


def _widget_views(notebook: Any) -> int:
    return sum(
        "application/vnd.jupyter.widget-view+json" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quickstart_notebook_runs(kernel_env: str) -> None:
    notebook = _execute("quickstart.ipynb", kernel_env)
    text = _text(notebook)
    assert "It is a fine day in Paris" in text
    assert "run_finished: DONE" in text  # the event listing
    assert "DONE · turns 2" in text  # the view's model, fed by its watcher
    assert _widget_views(notebook) == 1  # the RunView rendered as a widget


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_approvals_notebook_runs(kernel_env: str) -> None:
    notebook = _execute("approvals.ipynb", kernel_env)
    text = _text(notebook)
    assert "PAUSED AWAITING_APPROVAL" in text
    assert "do not match the tool's schema" in text  # the invalid edit, refused in the card
    assert "Done: Alice has the forecast." in text
    assert "send_email: ok (approved with edits)" in text
    assert _widget_views(notebook) == 2  # the live UI, and the one re-attached after "a restart"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quickstart_starts_its_own_engine_when_none_runs(kernel_spec: str) -> None:
    """A newcomer opens the quick start first, with no engine running: it needs no edits."""
    notebook = _execute("quickstart.ipynb", kernel_spec)
    text = _text(notebook)
    assert "started for this notebook" in text
    assert "It is a fine day in Paris" in text
    assert "DONE · turns 2" in text


COMPOSED = """
import ipywidgets as W
from client_py import EngineClient
from client_py.widgets import ApprovalPanel, RunView, show

client = EngineClient(os.environ["MACHINA_TARGET"])
script = [{"text": "Sending.", "tool_calls": [{"name": "send_email",
          "arguments": {"to": "a@example.com", "subject": "s", "body": "b"}}]}, {"text": "Sent."}]
first = client.create("one", model="scripted", script=script)
second = client.create("two", model="scripted", script=script)
both = W.HBox([RunView(first), RunView(second)])
tabs = W.Tab(children=[
    W.VBox([RunView(first), ApprovalPanel(first)]),
    W.Accordion(children=[ApprovalPanel(second)]),
])
tabs.titles = ("first", "second")
panel = tabs.children[1].children[0]
assert panel.model.wait_for(lambda m: len(m.cards) == 1, timeout=20)
panel.cards[0].approve_button.click()
assert second.wait(timeout=20).state == "DONE"
print("composed ok", type(both).__name__, type(tabs).__name__, isinstance(show(first), W.VBox))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_views_compose_like_widgets_in_a_real_kernel(kernel_env: str) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("import os"), nbformat.v4.new_code_cell(COMPOSED)]
    notebook.cells.append(nbformat.v4.new_code_cell("both"))
    notebook.cells.append(nbformat.v4.new_code_cell("tabs"))
    executed = _execute(notebook, kernel_env)
    assert "composed ok HBox Tab True" in _text(executed)
    assert _widget_views(executed) == 3  # show(first), both, tabs
