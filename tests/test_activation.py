"""Which requests a session covers: a cache() block its own thread or task (and the tasks it
starts), never a sibling task or another thread; enable() and the process-wide blocks every thread."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import httpx2

import metrion_fixture
from metrion_fixture.api import covering_process
from metrion_fixture.runtime.activation import active_session

ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "Two to four days."}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 12, "output_tokens": 6},
}


class Provider:
    """A MockTransport handler that counts the calls it answers, per prompt."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        prompt = json.loads(request.content)["messages"][0]["content"]
        self.calls[prompt] = self.calls.get(prompt, 0) + 1
        return httpx2.Response(200, json=ANSWER)


def body(prompt: str) -> dict:
    return {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": prompt}]}


async def ask(client: httpx2.AsyncClient, prompt: str) -> str | None:
    response = await client.post("https://api.anthropic.com/v1/messages", json=body(prompt))
    assert response.status_code == 200
    return response.headers.get("x-metrion-cache")


async def test_a_cache_block_in_one_task_does_not_cache_a_sibling_task() -> None:
    provider = Provider()
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(provider))
    inside, sibling_done = asyncio.Event(), asyncio.Event()
    mine, theirs = f"mine {uuid.uuid4().hex}", f"theirs {uuid.uuid4().hex}"

    async def with_block() -> list[str | None]:
        with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}") as session:
            tags = [await ask(client, mine)]
            inside.set()
            await sibling_done.wait()  # the sibling runs its requests while this block is open
            tags.append(await ask(client, mine))
            assert [call.status for call in session.calls] == ["MISS", "HIT"]  # none of the sibling's
        return tags

    async def sibling() -> list[str | None]:
        await inside.wait()
        tags = [await ask(client, theirs), await ask(client, theirs)]
        sibling_done.set()
        return tags

    block_tags, sibling_tags = await asyncio.gather(with_block(), sibling())
    assert block_tags == ["MISS", "HIT"]
    assert sibling_tags == [None, None]  # untouched by the cache: no tag, and...
    assert provider.calls[theirs] == 2  # ...both sent to the provider
    assert provider.calls[mine] == 1
    await client.aclose()


async def test_tasks_started_inside_a_block_are_covered() -> None:
    provider = Provider()
    prompt = f"child {uuid.uuid4().hex}"
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(provider)) as client:
        with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}"):
            first = await asyncio.create_task(ask(client, prompt))
            second = await asyncio.create_task(ask(client, prompt))
    assert (first, second) == ("MISS", "HIT") and provider.calls[prompt] == 1


def test_a_cache_block_does_not_cover_another_thread_but_a_process_block_does() -> None:
    seen: dict[str, object] = {}
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}") as block:
        thread = threading.Thread(target=lambda: seen.update(plain=active_session()))
        thread.start()
        thread.join()
        assert active_session() is block
    assert seen["plain"] is None

    with covering_process(metrion_fixture.CacheSession(f"memory://{uuid.uuid4().hex}")) as process_wide:
        thread = threading.Thread(target=lambda: seen.update(covered=active_session()))
        thread.start()
        thread.join()
        with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}") as inner:
            assert active_session() is inner  # the innermost block of this thread wins
        assert active_session() is process_wide
    assert seen["covered"] is process_wide and active_session() is None


def test_enable_covers_every_thread_and_a_block_overrides_it_in_its_own_thread() -> None:
    enabled = metrion_fixture.enable(f"memory://{uuid.uuid4().hex}")
    try:
        seen: list[object] = []
        with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}") as block:
            thread = threading.Thread(target=lambda: seen.append(active_session()))
            thread.start()
            thread.join()
            assert active_session() is block
        assert seen == [enabled] and active_session() is enabled
    finally:
        metrion_fixture.disable()
