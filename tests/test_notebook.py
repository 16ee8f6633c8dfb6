"""notebooks/quickstart.ipynb, executed in a real Jupyter kernel (ipykernel, driven by nbclient).

The test runs the simulated provider itself and hands its URL to the notebook
(METRION_DEMO_PROVIDER_URL), so it can count the provider calls each cell makes; the
cache store is a SQLite file in tmp_path (METRION_CACHE_URL), which outlives the kernel.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from metrion_fixture import cache_key
from metrion_fixture.runtime.ledger import read_records
from metrion_fixture.stores import open_store

pytestmark = pytest.mark.slow  # run by .ci/run; skip in a quick local loop with -m 'not slow'

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
MODEL = "claude-sonnet-4-5"  # the notebook's model offline: it has a price
SYSTEM = "You are the FAQ bot of an online shop. Answer in one or two sentences."

# Provider calls per cell id on a first run with an empty cache; every other cell makes none.
FIRST_RUN_CALLS = {"first-call": 1, "mixed": 1, "refresh-call": 1, "one-cell": 1}
# The cell after `%metrion_cache refresh` asks the provider again by design; nothing else does.
SECOND_RUN_CALLS = {"refresh-call": 1}


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, provider) -> Path:
    """What the kernel inherits: the test's provider and store, no API key, no user kernelspecs."""
    monkeypatch.setenv("METRION_DEMO_PROVIDER_URL", provider.url)
    monkeypatch.setenv("METRION_CACHE_URL", f"sqlite:///{tmp_path / 'cache.sqlite3'}")
    # What Jupyter Server tells the kernel it starts for a notebook: the records name it.
    monkeypatch.setenv("JPY_SESSION_NAME", str(NOTEBOOK))
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # Profiles and kernelspecs of the machine's user stay out: "python3" is this interpreter's kernel.
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir


def execute(workdir: Path, provider) -> tuple[nbformat.NotebookNode, dict[str, int]]:
    """Run every cell in a new kernel; return the executed notebook and each cell's provider calls."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=60, resources={"metadata": {"path": str(workdir)}})
    calls: dict[str, int] = {}
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            before = provider.call_count
            client.execute_cell(cell, index)
            calls[cell.id] = provider.call_count - before
    return notebook, calls


def pill(report: dict[str, str]) -> str:
    found = re.search(r'class="metrion-cache-pill" data-state="([a-z ]+)"', report["text/html"])
    assert found is not None, report
    return found.group(1)


def key(messages: list[dict[str, str]]) -> str:
    return cache_key(MODEL, messages)[:12]


def reports(cell: nbformat.NotebookNode) -> list[dict[str, str]]:
    return [
        output["data"]
        for output in cell.get("outputs", [])
        if output["output_type"] == "display_data" and output["data"].get("text/plain", "").startswith("metrion cache:")
    ]


def cell_by_id(notebook: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    return next(cell for cell in notebook.cells if cell.id == cell_id)


def test_quickstart_reruns_from_the_cache_after_a_kernel_restart(kernel_env: Path, provider, tmp_path: Path):
    """First run: the changed calls reach the provider. A new kernel: only the refreshed cell does,
    and each calling cell shows the report line."""
    first, first_calls = execute(kernel_env, provider)
    second_started = time.time()
    second, second_calls = execute(kernel_env, provider)

    assert {k: v for k, v in first_calls.items() if v} == FIRST_RUN_CALLS
    assert {k: v for k, v in second_calls.items() if v} == SECOND_RUN_CALLS
    assert (tmp_path / "cache.sqlite3").is_file()

    asked = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What are your delivery times?"}]
    norway = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do you ship to Norway?"}]
    [miss] = reports(cell_by_id(first, "first-call"))
    assert miss["text/plain"] == f"metrion cache: 0 from cache, 1 from the provider; missed: {MODEL} (key {key(asked)})"
    assert pill(miss) == "provider"
    [hit] = reports(cell_by_id(first, "rerun"))
    assert hit["text/plain"].startswith("metrion cache: 1 from cache, 0 from the provider, ")
    # The notebook's model has a price: the first hit a user sees says what it saved in dollars.
    assert re.search(r" tokens saved \(\$0\.\d{4}\)$", hit["text/plain"]), hit["text/plain"]
    assert pill(hit) == "cached" and "<summary>1 call</summary>" in hit["text/html"]
    [mixed] = reports(cell_by_id(first, "mixed"))  # one hit, one miss: not the green pill
    assert mixed["text/plain"].startswith("metrion cache: 1 from cache, 1 from the provider, ")
    assert mixed["text/plain"].endswith(f"; missed: {MODEL} (key {key(norway)})")
    assert pill(mixed) == "partly cached" and "<summary>2 calls</summary>" in mixed["text/html"]
    [refreshed] = reports(cell_by_id(second, "refresh-call"))
    assert refreshed["text/plain"] == "metrion cache: 0 from cache, 1 from the provider (1 refreshed)"
    for cell_id in ("first-call", "rerun", "mixed", "async-call", "one-cell"):
        [report] = reports(cell_by_id(second, cell_id))
        assert " 0 from the provider" in report["text/plain"], (cell_id, report)
        assert pill(report) == "cached", (cell_id, report)

    status = "".join(output.get("text", "") for output in cell_by_id(first, "status").outputs)
    assert "  calls      6 in this kernel (3 from cache, 2 missed, 1 refreshed, 0 bypassed, 0 refused)" in status
    # The ledger is in the store, which outlives the kernel: the second run's stats count both runs.
    [stats] = reports(cell_by_id(second, "stats"))
    assert stats["text/plain"].startswith(f"metrion cache: all time in sqlite:///{tmp_path / 'cache.sqlite3'}: ")
    assert f"\n{MODEL} " in stats["text/plain"] and "<svg" in stats["text/html"]

    # Each call's record names the notebook cell it came from.
    records = read_records(open_store(f"sqlite:///{tmp_path / 'cache.sqlite3'}"), "quickstart")
    numbers = {cell.execution_count: cell.id for cell in first.cells if cell.cell_type == "code"}
    first_run = [record for record in records if record["at"] < second_started]
    assert [(numbers[int(record["source"].rpartition(" cell ")[2])], record["status"]) for record in first_run] == [
        ("first-call", "MISS"),
        ("rerun", "HIT"),
        ("mixed", "HIT"),
        ("mixed", "MISS"),
        ("async-call", "HIT"),
        ("refresh-call", "REFRESH"),
        ("one-cell", "MISS"),
    ]
    assert {record["source"].rpartition(" cell ")[0] for record in records} == {"quickstart.ipynb"}


def test_quickstart_is_committed_without_outputs():
    """The notebook in the repository carries no outputs or execution counts."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]

    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
