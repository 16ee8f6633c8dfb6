"""Conformance: the client libraries people reach the cache through, each at its current release.

Every library sends the same call twice with the cache on (``enable()``, the in-process path) against
the simulated provider: MISS then HIT, one provider call, the library parsing the cached answer the
same way; sync, async and streamed where the library has them. A replay miss must reach the library
as a clear error that it neither retries nor reports as a timeout.

The libraries' pins conflict (openai 2 against 3, jiter), so they live in the virtual environments
described by ``tests/conformance/*.txt``, built here on first use under ``.cache/conformance/``
(named by a hash of the requirements, reused while they hold) with this project installed editable.
A build that fails is a failure, never a skip. Each environment then runs all its libraries' cases in
one process (``tests/conformance/run_library.py``, which prints one JSON line per case: the imports
they share happen once) and each case is a test here, so the matrix shows case by case.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "tests" / "conformance"
CACHE = ROOT / ".cache" / "conformance"
RUNNER = HERE / "run_library.py"

# environment -> (extras of this project it needs, its libraries)
ENVIRONMENTS = {"openai3": "proxy", "openai2": ""}

# library -> (environment, its cases). The runner implements exactly these.
SYNC, ASYNC, STREAM, ASTREAM, REPLAY = "sync", "async", "stream", "astream", "replay-miss"
# The second call in the other mode: a hit converted from the stored answer.
CONVERTED = ("json-then-stream", "stream-then-json")
EVERY_MODE = (SYNC, ASYNC, STREAM, ASTREAM, *CONVERTED, REPLAY)
LIBRARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "langchain-openai": ("openai3", EVERY_MODE),
    "langchain-anthropic": ("openai3", EVERY_MODE),
    "litellm-openai": ("openai3", EVERY_MODE),
    "litellm-anthropic": ("openai3", EVERY_MODE),
    "pydantic-ai": ("openai3", EVERY_MODE),
    "openai-agents": ("openai3", (SYNC, ASYNC, ASTREAM, REPLAY)),
    # dspy's litellm engine (engine="litellm"); proxy: through `metrion-cache serve`.
    "dspy": ("openai3", (SYNC, ASYNC, REPLAY, "proxy")),
    # dspy's default engine, lm15, which sends with an HTTP client of its own (integrations/lm15.py).
    "dspy-lm15": ("openai3", (*EVERY_MODE, "proxy")),
    "llama-index-llms-openai": ("openai2", EVERY_MODE),
    "instructor": ("openai2", (SYNC, ASYNC, STREAM, ASTREAM, REPLAY)),
}

# Cases that fail only because of a cache bug being fixed under issue 12; strict, so the marker
# has to go as soon as the fix lands.
KNOWN: dict[tuple[str, str], str] = {}

BUILD_TIMEOUT = 1200
RUN_TIMEOUT = 900
# No library may reach the internet: litellm would fetch its price table, openai-agents send traces.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "OPENAI_AGENTS_DISABLE_TRACING": "1",
    "OPENAI_API_KEY": "sk-conformance-test-key",
    "ANTHROPIC_API_KEY": "sk-ant-conformance-test-key",
}


def environment_dir(name: str) -> Path:
    """Where an environment lives: its requirements, this project's extras and the Python version make its name."""
    requirements = (HERE / f"{name}.txt").read_bytes()
    identity = requirements + ENVIRONMENTS[name].encode() + f"{sys.version_info[:2]}".encode()
    return CACHE / f"{name}-{hashlib.sha256(identity).hexdigest()[:16]}"


def build(name: str) -> Path:
    """The environment's Python, built once (under a lock: two sessions never build it at the same time)."""
    folder = environment_dir(name)
    python = folder / "bin" / "python"
    ready = folder / "ready"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists() and python.exists():
            return python
        shutil.rmtree(folder, ignore_errors=True)  # a build cut short is started over
        started = time.monotonic()
        target = f"{ROOT}[{ENVIRONMENTS[name]}]" if ENVIRONMENTS[name] else str(ROOT)
        steps = [
            [sys.executable, "-m", "venv", str(folder)],
            # --no-compile: most of these packages' modules are never imported here; the ones that are
            # get their bytecode written on the first run.
            [str(python), "-m", "pip", "install", "-q", "--no-compile", "-r", str(HERE / f"{name}.txt"), "-e", target],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"building the {name} conformance environment took over {BUILD_TIMEOUT} s: {step}")
            if done.returncode != 0:
                pytest.fail(
                    f"could not build the {name} conformance environment in {folder} ({done.returncode}): "
                    f"{' '.join(step)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
        freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
        ready.write_text(freeze.stdout)
        print(f"\nbuilt the {name} conformance environment in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return python


_builds: dict[str, Future[Path]] = {}
_runs: dict[str, dict[tuple[str, str], Any]] = {}


def environment_python(name: str) -> Path:
    """The environment's Python; the first call starts building every environment at once (pip waits on the network)."""
    if not _builds:
        pool = ThreadPoolExecutor(len(ENVIRONMENTS), thread_name_prefix="conformance-build")
        _builds.update({environment: pool.submit(build, environment) for environment in ENVIRONMENTS})
        pool.shutdown(wait=False)
    return _builds[name].result()


def run_environment(environment: str, tmp_root: Path) -> dict[tuple[str, str], Any]:
    """Every case of the environment's libraries, run once in one process; (library, case) -> its result line."""
    if environment in _runs:
        return _runs[environment]
    python = environment_python(environment)
    workdir = tmp_root / environment
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("METRION_", "OPENAI_", "ANTHROPIC_"))},
        **OFFLINE_ENV,
        "DSPY_CACHEDIR": str(workdir / "dspy-cache"),
        "HOME": str(workdir),  # libraries that write under ~ (dspy, litellm) write here
    }
    wanted = [f"{library}={','.join(cases)}" for library, (where, cases) in LIBRARIES.items() if where == environment]
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(python), str(RUNNER), *wanted],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=workdir,
            env=env,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{environment}: the cases did not finish within {RUN_TIMEOUT} s\n{error.stdout}\n{error.stderr}")
    results: dict[tuple[str, str], Any] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["library"], result["case"]] = result
    results["_process", ""] = {
        "returncode": done.returncode,
        "stderr": done.stderr[-4000:],
        "seconds": time.monotonic() - started,
    }
    _runs[environment] = results
    return results


@pytest.fixture(scope="session")
def conformance_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("conformance")


def _matrix() -> Iterator[Any]:
    for library, (_, cases) in LIBRARIES.items():
        for case in cases:
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN[library, case])] if (library, case) in KNOWN else []
            yield pytest.param(library, case, id=f"{library}-{case}", marks=marks)


@pytest.mark.slow
@pytest.mark.conformance
@pytest.mark.parametrize(("library", "case"), list(_matrix()))
def test_library_through_the_cache(library: str, case: str, conformance_tmp: Path) -> None:
    """See the module docstring; the case's own assertions are in tests/conformance/run_library.py."""
    results = run_environment(LIBRARIES[library][0], conformance_tmp)
    result = results.get((library, case))
    if result is None:
        process = results["_process", ""]
        pytest.fail(f"{library}: no result for {case} (exit {process['returncode']}):\n{process['stderr']}")
    if not result["ok"]:
        pytest.fail(f"{library} {case}: {result['detail']}", pytrace=False)
