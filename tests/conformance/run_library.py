"""The client libraries' conformance cases, run in their environment (see tests/test_conformance.py).

``python run_library.py LIBRARY=CASE,CASE ...`` prints one JSON line per case:
``{"library", "case", "ok", "detail", "seconds"}``.
Each case starts from an empty in-process cache (``metrion_fixture.enable()`` on a fresh memory
store) and the simulated provider of ``metrion_fixture.testing``, with every library at its
defaults (retries included: a replay miss must not be retried by them).

- ``sync`` / ``async`` / ``stream`` / ``astream``: the same call twice; MISS then HIT, one provider
  call, and the library's parsed result the same both times and the provider's answer.
- ``json-then-stream`` / ``stream-then-json``: the second call in the other mode is a HIT too
  (the stored answer converted), parsed the same; a stream stored without usage is a MISS for a
  JSON request (see ``stream_carries_usage``).
- ``replay-miss``: in replay mode on an empty store, the call raises an error that says "replay",
  is no timeout of any kind, and reached the cache once (not retried) and the provider never.
- ``proxy`` (dspy): the same, through ``metrion-cache serve`` instead of in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import metrion_fixture
from metrion_fixture.testing.provider import SimulatedProvider, make_answer

OPENAI_KEY = "sk-conformance-test-key"
ANTHROPIC_KEY = "sk-ant-conformance-test-key"
OPENAI_MODEL = "gpt-4o-mini"  # a name every library knows (llama-index looks up its context window)
ANTHROPIC_MODEL = "claude-sonnet-4-5"

# A call: the question -> what the library parsed (text, or a structured output as a dict).
Call = Callable[[str], Any]
ACall = Callable[[str], Awaitable[Any]]


class CaseFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CaseFailed(message)


def question() -> str:
    # Unique per case: no case can hit another's answer.
    return f"What are your delivery times? (case {uuid.uuid4().hex[:10]})"


# -- the checks ------------------------------------------------------------------------------------------------


def miss_then_hit(
    provider: SimulatedProvider,
    call: Call,
    expected: Callable[[str], Any] | None = None,
    then: Call | None = None,
    hit_expected: Callable[[SimulatedProvider], bool] = lambda provider: True,
) -> str:
    """The same call twice through a fresh cache (``then``: the second in the other mode); a summary for the report.

    ``hit_expected`` says from the first request whether the second can be a hit (else both are misses).
    """
    asked = question()
    session = metrion_fixture.enable(f"memory://{uuid.uuid4().hex}")
    provider.reset()
    try:
        first = call(asked)
        second = (then or call)(asked)
    finally:
        metrion_fixture.disable()
    statuses = [record.status for record in session.calls]
    hit = hit_expected(provider)
    expected_statuses, expected_calls = (["MISS", "HIT"], 1) if hit else (["MISS", "MISS"], 2)
    check(statuses == expected_statuses, f"cache statuses {statuses}, expected {expected_statuses}")
    check(
        provider.call_count == expected_calls,
        f"the provider was called {provider.call_count} times, expected {expected_calls}",
    )
    check(first == second, f"the library parsed the hit differently:\n  miss: {first!r}\n  hit:  {second!r}")
    want = (expected or make_answer)(asked)
    check(first == want, f"the library parsed {first!r}, the provider answered {want!r}")
    return f"{statuses}, provider called {expected_calls}x, parsed {str(first)[:60]!r}"


def stream_carries_usage(provider: SimulatedProvider) -> bool:
    """Whether the first (streamed) request's stored answer holds the usage a non-streamed answer needs.

    Anthropic streams always carry it; an OpenAI Chat stream only when the request asked for it
    (``stream_options.include_usage``). Without it, a JSON request is a miss: the cache never makes
    an answer that lacks a field every real one has (issue 12).
    """
    streamed = provider.calls[0]
    if streamed.path.endswith("/v1/messages"):
        return True
    options = streamed.json.get("stream_options") if isinstance(streamed.json, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


def replay_miss(provider: SimulatedProvider, call: Call) -> str:
    """An empty store in replay mode: a clear error, once, no timeout, and the provider never called."""
    session = metrion_fixture.enable(f"memory://{uuid.uuid4().hex}", mode="replay")
    provider.reset()
    started = time.monotonic()
    try:
        result = call(question())
    except Exception as error:  # noqa: BLE001 - what the library raises is what is checked
        raised = error
    else:
        raise CaseFailed(f"no error in replay mode on an empty store; the library returned {result!r}")
    finally:
        metrion_fixture.disable()
    elapsed = time.monotonic() - started
    chain = []
    seen: BaseException | None = raised
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = [f"{kind.__module__}.{kind.__qualname__}" for error in chain for kind in type(error).__mro__]
    described = " <- ".join(f"{type(error).__module__}.{type(error).__qualname__}" for error in chain)
    check(provider.call_count == 0, f"the provider was called {provider.call_count} times in replay mode")
    lookups = len(session.calls)
    check(
        lookups == 1, f"the library asked {lookups} times ({elapsed:.1f} s): it retried the replay miss [{described}]"
    )
    timeouts = sorted({name for name in names if "timeout" in name.lower()})
    check(not timeouts, f"the replay miss reached the library as a timeout: {described} (a {', '.join(timeouts)})")
    check(
        any("replay" in str(error) for error in chain),
        f"the library's error does not say why (replay mode): {described}: {str(raised)[:300]}",
    )
    return f"{described}, asked once, {elapsed:.2f} s"


LOOP = asyncio.new_event_loop()


def run_sync(acall: ACall) -> Call:
    """An async call made sync, on the one event loop of this process, as in an async application.

    Not a loop per call: langchain-openai and others keep one async HTTP client per process, whose
    pooled connections break on the next loop ("Event loop is closed") with or without the cache.
    """
    return lambda asked: LOOP.run_until_complete(acall(asked))


# -- the libraries ------------------------------------------------------------------------------------------------


def langchain_openai(provider: SimulatedProvider, case: str) -> str:
    from langchain_openai import ChatOpenAI

    def llm() -> Any:
        return ChatOpenAI(model=OPENAI_MODEL, base_url=provider.url + "/v1", api_key=OPENAI_KEY)

    return _langchain(provider, case, llm)


def langchain_anthropic(provider: SimulatedProvider, case: str) -> str:
    from langchain_anthropic import ChatAnthropic

    def llm() -> Any:
        return ChatAnthropic(model=ANTHROPIC_MODEL, base_url=provider.url, api_key=ANTHROPIC_KEY, max_tokens=200)

    return _langchain(provider, case, llm)


def _langchain(provider: SimulatedProvider, case: str, llm: Callable[[], Any]) -> str:
    async def ainvoke(asked: str) -> str:
        return str((await llm().ainvoke(asked)).content)

    async def astream(asked: str) -> str:
        return "".join([str(chunk.content) async for chunk in llm().astream(asked)])

    calls: dict[str, Call] = {
        "sync": lambda asked: str(llm().invoke(asked).content),
        "async": run_sync(ainvoke),
        "stream": lambda asked: "".join(str(chunk.content) for chunk in llm().stream(asked)),
        "astream": run_sync(astream),
    }
    return _standard(provider, case, calls)


def _standard(provider: SimulatedProvider, case: str, calls: dict[str, Call]) -> str:
    if case == "replay-miss":
        return replay_miss(provider, calls["sync"])
    if case == "json-then-stream":  # the stored answer converted to a stream
        return miss_then_hit(provider, calls["sync"], then=calls["stream"])
    if case == "stream-then-json":
        return miss_then_hit(provider, calls["stream"], then=calls["sync"], hit_expected=stream_carries_usage)
    return miss_then_hit(provider, calls[case])


def litellm_openai(provider: SimulatedProvider, case: str) -> str:
    options = {"model": f"openai/{OPENAI_MODEL}", "api_base": provider.url + "/v1", "api_key": OPENAI_KEY}
    return _litellm(provider, case, options)


def litellm_anthropic(provider: SimulatedProvider, case: str) -> str:
    options = {
        "model": f"anthropic/{ANTHROPIC_MODEL}",
        "api_base": provider.url,
        "api_key": ANTHROPIC_KEY,
        "max_tokens": 200,
    }
    return _litellm(provider, case, options)


def _litellm(provider: SimulatedProvider, case: str, options: dict[str, Any]) -> str:
    import litellm

    def messages(asked: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": asked}]

    def stream(asked: str) -> str:
        chunks = litellm.completion(messages=messages(asked), stream=True, **options)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    async def acomplete(asked: str) -> str:
        return str((await litellm.acompletion(messages=messages(asked), **options)).choices[0].message.content)

    async def astream(asked: str) -> str:
        chunks = await litellm.acompletion(messages=messages(asked), stream=True, **options)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in chunks if chunk.choices])

    calls: dict[str, Call] = {
        "sync": lambda asked: str(litellm.completion(messages=messages(asked), **options).choices[0].message.content),
        "async": run_sync(acomplete),
        "stream": stream,
        "astream": run_sync(astream),
    }
    return _standard(provider, case, calls)


def pydantic_ai(provider: SimulatedProvider, case: str) -> str:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    def agent() -> Any:
        model = OpenAIChatModel(
            OPENAI_MODEL, provider=OpenAIProvider(base_url=provider.url + "/v1", api_key=OPENAI_KEY)
        )
        return Agent(model)

    async def arun(asked: str) -> str:
        return str((await agent().run(asked)).output)

    def stream(asked: str) -> str:
        with agent().run_stream_sync(asked) as result:
            return "".join(result.stream_text(delta=True, debounce_by=None))

    async def astream(asked: str) -> str:
        async with agent().run_stream(asked) as result:
            return "".join([text async for text in result.stream_text(delta=True, debounce_by=None)])

    calls: dict[str, Call] = {
        "sync": lambda asked: str(agent().run_sync(asked).output),
        "async": run_sync(arun),
        "stream": stream,
        "astream": run_sync(astream),
    }
    return _standard(provider, case, calls)


def openai_agents(provider: SimulatedProvider, case: str) -> str:
    import openai
    from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)

    def agent() -> Any:
        client = openai.AsyncOpenAI(base_url=provider.url + "/v1", api_key=OPENAI_KEY)
        return Agent(name="faq", model=OpenAIResponsesModel(model=OPENAI_MODEL, openai_client=client))

    async def arun(asked: str) -> str:
        return str((await Runner.run(agent(), asked)).final_output)

    async def astream(asked: str) -> str:
        result = Runner.run_streamed(agent(), asked)
        async for _ in result.stream_events():
            pass
        return str(result.final_output)

    calls: dict[str, Call] = {
        "sync": lambda asked: str(Runner.run_sync(agent(), asked).final_output),
        "async": run_sync(arun),
        "astream": run_sync(astream),
    }
    return _standard(provider, case, calls)


def llama_index(provider: SimulatedProvider, case: str) -> str:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAI

    def llm() -> Any:
        return OpenAI(model=OPENAI_MODEL, api_base=provider.url + "/v1", api_key=OPENAI_KEY)

    def messages(asked: str) -> list[Any]:
        return [ChatMessage(role="user", content=asked)]

    def stream(asked: str) -> str:
        # Each streamed response carries the message so far: the last one holds the whole answer.
        responses = list(llm().stream_chat(messages(asked)))
        return str(responses[-1].message.content)

    async def achat(asked: str) -> str:
        return str((await llm().achat(messages(asked))).message.content)

    async def astream(asked: str) -> str:
        responses = [response async for response in await llm().astream_chat(messages(asked))]
        return str(responses[-1].message.content)

    calls: dict[str, Call] = {
        "sync": lambda asked: str(llm().chat(messages(asked)).message.content),
        "async": run_sync(achat),
        "stream": stream,
        "astream": run_sync(astream),
    }
    return _standard(provider, case, calls)


def instructor_cases(provider: SimulatedProvider, case: str) -> str:
    import instructor
    import openai
    from pydantic import BaseModel

    class Delivery(BaseModel):
        city: str

    # The simulated provider echoes the last user message, so a prompt that holds JSON gets an answer
    # that holds it; instructor's markdown-JSON mode takes the last JSON object of the answer. (Its
    # tool and JSON modes need a provider that answers with tool calls or JSON alone.)
    def city(asked: str) -> str:
        return "Paris " + asked.rsplit("case ", 1)[1].rstrip(")")

    def prompt(asked: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": json.dumps({"city": city(asked)})}]

    def client() -> Any:
        return instructor.from_openai(
            openai.OpenAI(base_url=provider.url + "/v1", api_key=OPENAI_KEY), mode=instructor.Mode.MD_JSON
        )

    def aclient() -> Any:
        return instructor.from_openai(
            openai.AsyncOpenAI(base_url=provider.url + "/v1", api_key=OPENAI_KEY), mode=instructor.Mode.MD_JSON
        )

    def create(asked: str) -> dict[str, Any]:
        reply = client().chat.completions.create(model=OPENAI_MODEL, response_model=Delivery, messages=prompt(asked))
        return reply.model_dump()

    async def acreate(asked: str) -> dict[str, Any]:
        completions = aclient().chat.completions
        reply = await completions.create(model=OPENAI_MODEL, response_model=Delivery, messages=prompt(asked))
        return reply.model_dump()

    # Streamed: partial objects as the JSON arrives; the last one is the whole answer.
    def partial(asked: str) -> dict[str, Any]:
        completions = client().chat.completions
        parts = list(completions.create_partial(model=OPENAI_MODEL, response_model=Delivery, messages=prompt(asked)))
        return parts[-1].model_dump()

    async def apartial(asked: str) -> dict[str, Any]:
        completions = aclient().chat.completions
        stream = completions.create_partial(model=OPENAI_MODEL, response_model=Delivery, messages=prompt(asked))
        parts = [part async for part in stream]
        return parts[-1].model_dump()

    if case == "replay-miss":
        return replay_miss(provider, create)
    call = {"sync": create, "async": run_sync(acreate), "stream": partial, "astream": run_sync(apartial)}[case]
    return miss_then_hit(provider, call, expected=lambda asked: {"city": city(asked)})


def dspy_cases(provider: SimulatedProvider, case: str) -> str:
    """dspy with its litellm engine (``engine="litellm"``), in-process and through the proxy."""
    return _dspy(provider, case, "litellm")


def dspy_lm15(provider: SimulatedProvider, case: str) -> str:
    """dspy with its default engine, lm15, which sends with an HTTP client of its own (the lm15 adapter)."""
    return _dspy(provider, case, "lm15")


def _dspy(provider: SimulatedProvider, case: str, engine: str) -> str:
    import dspy

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)  # only this cache answers

    # dspy's JSON adapter reads the fields from the first JSON object of the answer; the simulated
    # provider echoes the question, so a question that holds one is answered with it. (The chat
    # adapter's "[[ ## answer ## ]]" markers must start lines, and the echo is on one line.)
    def answer_of(asked: str) -> str:
        return "Paris " + asked.rsplit("case ", 1)[1].rstrip(")")

    def inputs(asked: str) -> dict[str, str]:
        return {"question": json.dumps({"answer": answer_of(asked)})}

    def lm_for(api_base: str, **options: Any) -> Any:
        return dspy.LM(
            f"openai/{OPENAI_MODEL}", api_base=api_base, api_key=OPENAI_KEY, cache=False, engine=engine, **options
        )

    def predict(asked: str, api_base: str = provider.url + "/v1", **options: Any) -> str:
        with dspy.context(lm=lm_for(api_base, **options), adapter=dspy.JSONAdapter()):
            return str(dspy.Predict("question -> answer")(**inputs(asked)).answer)

    async def apredict(asked: str) -> str:
        with dspy.context(lm=lm_for(provider.url + "/v1"), adapter=dspy.JSONAdapter()):
            return str((await dspy.Predict("question -> answer").acall(**inputs(asked))).answer)

    # Streamed (dspy.streamify): dspy asks the engine for a stream; the program's outputs come last,
    # parsed from the stream. Sync: the program runs in a worker thread, through the sync transport.
    def streamed(values: list[Any]) -> str:
        predictions = [value for value in values if isinstance(value, dspy.Prediction)]
        check(len(values) > 1 and len(predictions) == 1, f"streamify gave {values!r}")
        return str(predictions[0].answer)

    def stream(asked: str) -> str:
        program = dspy.streamify(dspy.Predict("question -> answer"), async_streaming=False)
        with dspy.context(lm=lm_for(provider.url + "/v1"), adapter=dspy.JSONAdapter()):
            return streamed(list(program(**inputs(asked))))

    async def astream(asked: str) -> str:
        program = dspy.streamify(dspy.Predict("question -> answer"), is_async_program=True)
        with dspy.context(lm=lm_for(provider.url + "/v1"), adapter=dspy.JSONAdapter()):
            return streamed([value async for value in program(**inputs(asked))])

    if case == "proxy":
        # Through `metrion-cache serve`: litellm opts in per request with the header; lm15 takes no
        # extra headers, so that proxy caches every request (--mode true).
        return through_the_proxy(provider, predict, answer_of, opt_in=engine == "litellm")
    if case == "replay-miss":
        return replay_miss(provider, predict)
    if case == "json-then-stream":
        return miss_then_hit(provider, predict, expected=answer_of, then=stream)
    if case == "stream-then-json":
        return miss_then_hit(provider, stream, expected=answer_of, then=predict, hit_expected=stream_carries_usage)
    calls: dict[str, Call] = {
        "sync": predict,
        "async": run_sync(apredict),
        "stream": stream,
        "astream": run_sync(astream),
    }
    return miss_then_hit(provider, calls[case], expected=answer_of)


# -- the proxy ------------------------------------------------------------------------------------------------------


def through_the_proxy(
    provider: SimulatedProvider, predict: Callable[..., str], answer_of: Callable[[str], str], *, opt_in: bool
) -> str:
    """dspy with its base URL on `metrion-cache serve`: opted in per request with the header, or a proxy in mode true."""
    from metrion_fixture.reporting.reports import stats
    from metrion_fixture.stores import open_store

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = f"sqlite:///{tempfile.mkdtemp()}/proxy.sqlite3"
    command = [sys.executable, "-m", "metrion_fixture.cli", "serve", "--port", str(port), "--url", store]
    server = subprocess.Popen(
        [
            *command,
            "--namespace",
            "conformance",
            "--upstream",
            f"openai={provider.url}",
            *([] if opt_in else ["--mode", "true"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("METRION_")},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/_metrion/health", timeout=1)
                break
            except OSError:
                check(server.poll() is None and time.monotonic() < deadline, "metrion-cache serve did not start")
                time.sleep(0.05)
        provider.reset()
        asked = question()
        headers = {"extra_headers": {"x-metrion-cache": "true"}} if opt_in else {}
        first = predict(asked, api_base=f"{base}/openai/v1", **headers)
        second = predict(asked, api_base=f"{base}/openai/v1", **headers)
    finally:
        server.terminate()  # a clean stop writes the proxy's ledger
        output = server.communicate(timeout=30)[0].decode(errors="replace")
    check(provider.call_count == 1, f"the provider was called {provider.call_count} times, expected once\n{output}")
    check(first == second == answer_of(asked), f"dspy parsed {first!r} then {second!r}")
    totals = stats(open_store(store), "conformance").total
    check((totals.misses, totals.hits) == (1, 1), f"the proxy's ledger: {totals.as_dict()}\n{output}")
    return f"MISS then HIT through the proxy, provider called once, parsed {first!r}"


LIBRARIES: dict[str, Callable[[SimulatedProvider, str], str]] = {
    "langchain-openai": langchain_openai,
    "langchain-anthropic": langchain_anthropic,
    "litellm-openai": litellm_openai,
    "litellm-anthropic": litellm_anthropic,
    "pydantic-ai": pydantic_ai,
    "openai-agents": openai_agents,
    "dspy": dspy_cases,
    "dspy-lm15": dspy_lm15,
    "llama-index-llms-openai": llama_index,
    "instructor": instructor_cases,
}


def main() -> None:
    """Arguments: ``LIBRARY=CASE,CASE`` for each library (one process: the libraries' common imports happen once)."""
    wanted = [
        (library, case)
        for arg in sys.argv[1:]
        for library, _, cases in [arg.partition("=")]
        for case in cases.split(",")
    ]
    with SimulatedProvider() as provider:
        for library, case in wanted:
            started = time.monotonic()
            try:
                detail, ok = LIBRARIES[library](provider, case), True
            except CaseFailed as failure:
                detail, ok = str(failure), False
            except Exception:  # noqa: BLE001 - a library that breaks on the cache's answer is the finding
                detail, ok = traceback.format_exc(limit=-8), False
            seconds = round(time.monotonic() - started, 2)
            result = {"library": library, "case": case, "ok": ok, "detail": detail, "seconds": seconds}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
