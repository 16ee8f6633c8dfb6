"""Start-up cost: what importing the package and loading the pytest plugin pull in.

Every pytest run of a project that installed the package loads the plugin, and every notebook
that imports it pays for the import, cache or not: both must leave the runtime, the stores'
client libraries and the HTTP libraries unimported until a session is made. Checked in a fresh
interpreter (this one has imported everything already) by which modules are loaded, never by time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

# Nothing a run without the cache needs: the HTTP and store client libraries, the runtime, the
# wire formats and the core's engine, and what only they import (asyncio, the price table's TOML).
HEAVY = (
    "httpx",
    "httpx2",
    "redis",
    "sqlite3",
    "asyncio",
    "tomllib",
    "metrion_fixture.api",
    "metrion_fixture.runtime.session",
    "metrion_fixture.core.engine",
    "metrion_fixture.formats",
    "metrion_fixture.stores",
    "metrion_fixture.reporting.reports",
)

REPORT_MODULES = """
import json, sys
HEAVY = {heavy!r}
print("LOADED=" + json.dumps([name for name in HEAVY if name in sys.modules]))
"""


def loaded_after(code: str, cwd: Path) -> list[str]:
    """Which of HEAVY a fresh interpreter has loaded after running ``code``."""
    script = code + REPORT_MODULES.format(heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.rpartition("LOADED=")[2])


def test_importing_the_package_loads_none_of_the_runtime(tmp_path):
    assert loaded_after("import metrion_fixture\n", tmp_path) == []


def test_the_public_names_are_there_when_asked_for(tmp_path):
    code = textwrap.dedent(
        """
        import metrion_fixture
        from metrion_fixture import CacheSession, CallRecord, MetrionCacheError, Stats, cache, cache_key, enable
        from metrion_fixture.api import cache as api_cache
        from metrion_fixture.runtime.session import CacheSession as session_class
        assert cache is api_cache and CacheSession is session_class and metrion_fixture.disable
        assert set(metrion_fixture.__all__) <= set(dir(metrion_fixture))
        try:
            metrion_fixture.no_such_name
        except AttributeError as error:
            assert "no_such_name" in str(error)
        else:
            raise AssertionError("an unknown name must raise AttributeError")
        """
    )
    assert "metrion_fixture.runtime.session" in loaded_after(code, tmp_path)


def test_a_pytest_run_that_does_not_use_the_cache_loads_none_of_the_runtime(tmp_path):
    # Only our plugin (autoload off): another plugin of this environment could import asyncio itself.
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert 2 + 2 == 4\n")
    (tmp_path / "conftest.py").write_text(
        "def pytest_unconfigure(config):\n" + textwrap.indent(REPORT_MODULES.format(heavy=HEAVY), "    ")
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "metrion_fixture.integrations.pytest_plugin", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert json.loads(result.stdout.rpartition("LOADED=")[2].splitlines()[0]) == []


def test_a_pytest_run_that_uses_the_cache_loads_the_runtime(tmp_path):
    # The other side of the check above: the same probe sees the runtime once a test asks for it.
    (tmp_path / "test_cached.py").write_text(
        "def test_cached(metrion_cache):\n    assert metrion_cache.stats.hits == 0\n"
    )
    (tmp_path / "conftest.py").write_text(
        "def pytest_unconfigure(config):\n" + textwrap.indent(REPORT_MODULES.format(heavy=HEAVY), "    ")
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "metrion_fixture.integrations.pytest_plugin",
            "-p",
            "no:cacheprovider",
            "--metrion-cache-url=memory://",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = json.loads(result.stdout.rpartition("LOADED=")[2].splitlines()[0])
    assert {"metrion_fixture.runtime.session", "metrion_fixture.core.engine"} <= set(loaded)


def test_enable_patches_an_http_library_when_it_is_imported_not_before(tmp_path):
    # An httpx2 user does not pay for importing httpx (and its CLI's click and pygments) to patch it;
    # httpx imported later is patched at once, and unpatched by disable().
    code = textwrap.dedent(
        """
        import sys
        import httpx2
        import metrion_fixture
        session = metrion_fixture.enable("memory://")
        assert "httpx" not in sys.modules
        import httpx
        def answer(request):
            return httpx.Response(200, json={"id": "msg_1", "type": "message", "content": []})
        body = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(transport=httpx.MockTransport(answer)) as client:
            tags = [client.post("https://api.anthropic.com/v1/messages", json=body).headers.get("x-metrion-cache")
                    for _ in range(2)]
        assert tags == ["MISS", "HIT"], tags
        patched = httpx.Client._transport_for_url
        metrion_fixture.disable()
        assert httpx.Client._transport_for_url is not patched
        assert not [hook for hook in sys.meta_path if type(hook).__name__ == "_PatchOnImport"]
        """
    )
    assert "httpx" in loaded_after(code, tmp_path)  # the script's own asserts passed (it exited 0)
