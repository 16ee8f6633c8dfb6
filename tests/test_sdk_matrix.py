"""The core promise, for both SDKs, sync and async, streamed and not, on every store:
the first request reaches the provider, the identical second one is answered by
the cache with the same content and no provider call."""

from __future__ import annotations

import pytest
from sdk_calls import SDKS, call


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("sdk", SDKS)
def test_second_identical_request_is_a_hit(provider, session, sdk, use_async, stream):
    first = call(sdk, provider.url, stream=stream, use_async=use_async)
    second = call(
        sdk, provider.url, stream=stream, use_async=use_async, extra_body={"max_tokens": 7, "temperature": 0.3}
    )

    assert provider.call_count == 1
    assert first.cache == "MISS" and second.cache == "HIT"
    assert "delivery" in first.text and second.text == first.text
    assert second.usage == first.usage
    assert first.headers["x-metrion-cache-key"] == second.headers["x-metrion-cache-key"]
    assert int(second.headers["age"]) >= 0
    assert (session.stats.misses, session.stats.hits, session.stats.stored) == (1, 1, 1)
    assert [record.status for record in session.calls] == ["MISS", "HIT"]
    assert all(record.stream is stream for record in session.calls)
