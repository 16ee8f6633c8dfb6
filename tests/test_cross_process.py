"""A shared store is shared across processes: an answer one interpreter stored is a hit
in another one that enables the cache with the same URL and namespace."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdk_calls import QUESTION, call

import metrion_fixture
from metrion_fixture.stores import open_store

ROOT = Path(__file__).resolve().parents[1]

# The child: a fresh interpreter that enables the cache and makes the same Anthropic SDK request.
CHILD = """
import json, sys
import anthropic
import metrion_fixture

url, namespace, base_url, messages = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
session = metrion_fixture.enable(url, namespace=namespace)
client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-child-key", max_retries=0)
raw = client.messages.with_raw_response.create(model="claude-test", max_tokens=100, messages=messages)
text = "".join(block.text for block in raw.parse().content)
print(json.dumps({
    "cache": raw.headers.get("x-metrion-cache"),
    "key": raw.headers.get("x-metrion-cache-key"),
    "text": text,
    "stats": session.stats.as_dict(),
}))
"""


def run_child(url: str, namespace: str, base_url: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, url, namespace, base_url, json.dumps(QUESTION)],
        cwd=ROOT,  # the child imports this checkout's metrion_fixture
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # a failure shows the child's stderr below
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[str]:
    """A store URL two processes can both open."""
    url = (
        f"sqlite:///{tmp_path / 'shared.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("redis_url")
    )
    yield url
    open_store(url).delete_prefix(f"{namespace}:")


def test_a_second_process_hits_what_the_first_stored(provider, shared_url, namespace):
    """Stored here, read by a new interpreter: a HIT there, and the provider is not called again."""
    with metrion_fixture.cache(shared_url, namespace=namespace) as session:
        parent = call("anthropic", provider.url)
    assert parent.cache == "MISS" and session.stats.stored == 1
    assert provider.call_count == 1

    child = run_child(shared_url, namespace, provider.url)

    assert child["cache"] == "HIT"
    assert child["key"] == parent.headers["x-metrion-cache-key"]
    assert child["text"] == parent.text
    assert (child["stats"]["hits"], child["stats"]["misses"]) == (1, 0)
    assert provider.call_count == 1


def test_this_process_hits_what_a_child_stored(provider, tmp_path, namespace):
    """Stored by a new interpreter in a SQLite file, read here: a HIT, and the provider was called once."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    child = run_child(url, namespace, provider.url)
    assert child["cache"] == "MISS" and child["stats"]["stored"] == 1
    assert provider.call_count == 1

    with metrion_fixture.cache(url, namespace=namespace) as session:
        parent = call("anthropic", provider.url)

    assert parent.cache == "HIT"
    assert parent.text == child["text"]
    assert parent.headers["x-metrion-cache-key"] == child["key"]
    assert [r.status for r in session.calls] == ["HIT"]
    assert provider.call_count == 1
