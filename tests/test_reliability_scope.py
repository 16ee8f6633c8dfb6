"""Isolation: with scope="credential" an entry is private to the API key that paid for it, and that key is never stored."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest
from sdk_calls import QUESTION, SDKS, call
from test_magic import ip, run, shell  # noqa: F401 - the IPython shell fixtures

import metrion_fixture
import metrion_fixture.stores.redis
import metrion_fixture.stores.sqlite
import metrion_fixture.transports.httpx
import metrion_fixture.transports.httpx2  # noqa: F401 - imported before pytester runs, see test_pytest_plugin
from metrion_fixture import MetrionCacheError
from metrion_fixture.core.scope import credential_tag
from metrion_fixture.stores import open_store

pytest_plugins = ["pytester"]

SECRET_A = "sk-secret-AAAA-" + uuid.uuid4().hex
SECRET_B = "sk-secret-BBBB-" + uuid.uuid4().hex


def client_for(sdk: str, base_url: str, api_key: str):
    if sdk == "anthropic":
        return anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0)
    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0)


@pytest.fixture
def scoped(store_url: str, namespace: str) -> Iterator[metrion_fixture.CacheSession]:
    with metrion_fixture.cache(store_url, namespace=namespace, scope="credential") as session:
        yield session


@pytest.mark.parametrize("sdk", SDKS)
def test_two_credentials_do_not_share_entries_and_one_credential_does(provider, scoped, sdk):
    """scope=credential: key A's answer is a HIT for key A only; key B pays for its own."""
    a, b = client_for(sdk, provider.url, SECRET_A), client_for(sdk, provider.url, SECRET_B)
    answers = [call(sdk, provider.url, client=client) for client in (a, b, a, b)]
    assert [x.cache for x in answers] == ["MISS", "MISS", "HIT", "HIT"]
    assert provider.call_count == 2
    assert answers[0].headers["x-metrion-cache-key"] == answers[1].headers["x-metrion-cache-key"]  # same request key


def test_the_default_scope_is_shared_within_the_namespace(provider, session):
    """Without scope, an answer paid by key A is a HIT for key B (as the proxy does)."""
    assert session.settings.scope == "shared"
    first = call("anthropic", provider.url, client=client_for("anthropic", provider.url, SECRET_A))
    second = call("anthropic", provider.url, client=client_for("anthropic", provider.url, SECRET_B))
    assert (first.cache, second.cache) == ("MISS", "HIT")


def _raw_store_bytes(url: str, namespace: str) -> bytes:
    """Everything the store holds for the namespace, keys and values, as its own files or client see it."""
    store = open_store(url)
    keys = store.keys(f"{namespace}:")
    found = b"\n".join(key.encode() + b"=" + (store.get(key) or b"") for key in keys)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        for file in (path, path.with_name(path.name + "-wal")):
            if file.exists():
                found += file.read_bytes()
    return found


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", SDKS)
def test_the_credential_never_reaches_the_store(provider, scoped, store_url, namespace, sdk, stream):
    """On every store, the API key appears in no key and no value (nor in its hash without the library's salt)."""
    for secret in (SECRET_A, SECRET_B):
        call(sdk, provider.url, stream=stream, client=client_for(sdk, provider.url, secret))
    raw = _raw_store_bytes(store_url, namespace)
    assert scoped.stats.stored == 2 and raw
    for secret in (SECRET_A, SECRET_B):
        assert secret.encode() not in raw
        assert hashlib.sha256(secret.encode()).hexdigest()[:16].encode() not in raw
    assert (
        credential_tag({"x-api-key": SECRET_A}).encode() in raw
        or credential_tag({"authorization": f"Bearer {SECRET_A}"}).encode() in raw
    )


@pytest.mark.parametrize(
    "where",
    [
        {"headers": {"x-goog-api-key": SECRET_A}},
        {"params": {"key": SECRET_A}},
        {"headers": {"authorization": f"Bearer {SECRET_A}"}},
        {"headers": {"x-api-key": SECRET_A}},
    ],
    ids=["x-goog-api-key", "query-key", "bearer", "x-api-key"],
)
def test_every_credential_form_scopes_entries(provider, namespace, where):
    """x-goog-api-key, ?key=, Authorization bearer and x-api-key each separate entries; no credential is its own scope."""
    body = {"model": "gpt-test", "messages": QUESTION}
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", namespace=namespace, scope="credential"):
        with httpx2.Client(base_url=provider.url) as client:
            first = client.post("/v1/chat/completions", json=body, **where)
            again = client.post("/v1/chat/completions", json=body, **where)
            anonymous = client.post("/v1/chat/completions", json=body)
            anonymous_again = client.post("/v1/chat/completions", json=body)
    tags = [r.headers["x-metrion-cache"] for r in (first, again, anonymous, anonymous_again)]
    assert tags == ["MISS", "HIT", "MISS", "HIT"]
    assert provider.call_count == 2


def test_the_tag_is_a_keyed_hash_of_the_credential():
    """Same credential → same tag whatever header carries it; different credentials → different tags; no plain hash."""
    tag = credential_tag({"x-api-key": SECRET_A})
    assert tag == credential_tag({"authorization": f"Bearer {SECRET_A}"}) == credential_tag({}, f"key={SECRET_A}")
    assert tag != credential_tag({"x-api-key": SECRET_B}) and tag != credential_tag({})
    assert len(tag) == 32 and SECRET_A not in tag
    assert tag != hashlib.sha256(SECRET_A.encode()).hexdigest()[:32]


def test_scope_from_the_environment_and_bad_scopes(monkeypatch):
    """METRION_CACHE_SCOPE sets the default; an explicit option wins; a bad scope raises at once."""
    monkeypatch.setenv("METRION_CACHE_SCOPE", "credential")
    assert metrion_fixture.CacheSession("memory://").settings.scope == "credential"
    assert metrion_fixture.CacheSession("memory://", scope="shared").settings.scope == "shared"
    monkeypatch.delenv("METRION_CACHE_SCOPE")
    assert metrion_fixture.CacheSession("memory://").settings.scope == "shared"
    with pytest.raises(MetrionCacheError, match="invalid cache scope"):
        metrion_fixture.CacheSession("memory://", scope="per-user")


def test_explicit_transports_take_the_scope_option(provider, namespace):
    """CacheTransport(scope="credential") keeps two keys' entries apart through a raw httpx2 client."""
    from metrion_fixture.transports.httpx2 import CacheTransport

    transport = CacheTransport(url=f"memory://{uuid.uuid4().hex}", namespace=namespace, scope="credential")
    body = {"model": "gpt-test", "messages": QUESTION}
    with httpx2.Client(base_url=provider.url, transport=transport) as client:
        tags = [
            client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}).headers[
                "x-metrion-cache"
            ]
            for key in (SECRET_A, SECRET_B, SECRET_A)
        ]
    assert tags == ["MISS", "MISS", "HIT"]


INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\nmetrion_cache_url = memory://plugin-scope\n"
PLUGIN_TEST = """
def test_scope(metrion_cache):
    assert metrion_cache.settings.scope == "{expected}"
"""


@pytest.mark.parametrize("how", ["option", "ini", "default"])
def test_the_pytest_plugin_takes_the_scope(pytester, monkeypatch, how):
    """--metrion-cache-scope and the ini option metrion_cache_scope reach the session; the default is shared."""
    monkeypatch.delenv("METRION_CACHE_SCOPE", raising=False)
    ini = INI
    if how == "ini":
        ini += "metrion_cache_scope = credential\n"
    pytester.makeini(ini)
    pytester.makepyfile(PLUGIN_TEST.format(expected="shared" if how == "default" else "credential"))
    args = ["--metrion-cache-scope", "credential"] if how == "option" else []
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)
    result.assert_outcomes(passed=1)


def test_the_pytest_plugin_refuses_a_bad_scope(pytester):
    """A bad --metrion-cache-scope is a usage error naming the option."""
    pytester.makeini(INI)
    pytester.makepyfile(PLUGIN_TEST.format(expected="x"))
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--metrion-cache-scope", "me"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--metrion-cache-scope" in result.stderr.str() and "invalid cache scope" in result.stderr.str()


def test_the_magic_takes_the_scope_flag(ip, provider, capsys):  # noqa: F811
    """%metrion_cache on --scope credential: status shows it, and two keys do not share an answer."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS --scope credential")
    run(ip, "%metrion_cache status")
    assert "scope      credential" in capsys.readouterr().out
    ip.user_ns.update(client_for=client_for, A=SECRET_A, B=SECRET_B)
    run(ip, "ANSWERS = [call('anthropic', URL, client=client_for('anthropic', URL, k)).cache for k in (A, B, A)]")
    assert ip.user_ns["ANSWERS"] == ["MISS", "MISS", "HIT"]
    run(ip, "%metrion_cache off")
