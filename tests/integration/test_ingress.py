"""The OpenAI HTTP app over real uvicorn and a real in-process engine, with the openai SDK."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from outrider.cluster import bench
from outrider.cluster.async_engine import AsyncEngine
from outrider.cluster.config import load_config
from outrider.cluster.ingress import build_app
from outrider.cluster.llm import EMBEDDED_MODEL_NAME as MODEL
from outrider.cluster.llm import LLM

API_KEY = "test-key"
OUTRIDER = str(Path(sys.executable).parent / "outrider")
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
PROMPTS = [
    "Name three colors.",
    "What is 2+2?",
    "Say hello in French.",
    "Count: 1 2 3 1 2 3 1 2 3",
    "What is the capital of Italy?",
    "Write one word about cats.",
    "Repeat: red blue red blue red blue",
    "Name a fruit.",
]


class Server:
    def __init__(self, engine: AsyncEngine, **app_kwargs: Any) -> None:
        self.engine = engine
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = build_app(engine, version="test-1", **app_kwargs)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    async def _main(self) -> None:
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            await self.engine.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _serve(llm: LLM, engine: AsyncEngine, **kwargs: Any) -> Server:
    return Server(
        engine,
        tokenizer=llm.tokenizer,
        served_model_name=engine.model_name,
        max_model_len=llm.max_model_len,
        **kwargs,
    )


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(load_config(None, {"speculative": SPEC}))


@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[Server]:
    srv = _serve(llm, llm.async_engine(), api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def _wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _chat(client: openai.OpenAI, prompt: str, **kw: Any) -> Any:
    msgs = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(
        model=MODEL, messages=msgs, temperature=0, max_tokens=8, **kw
    )


def _assert_alive(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert len(out.choices) == 1 and out.usage.completion_tokens == 1


def test_chat_and_completion_not_streamed(server: Server, client: openai.OpenAI) -> None:
    chat = _chat(client, PROMPTS[0], extra_body={"unknown_field": 1, "logit_bias": {}})
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    assert chat.model == MODEL and chat.created > 0
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = chat.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    eos = {"ignore_eos": True}
    comp = client.completions.create(model=MODEL, prompt="Sky", max_tokens=5, extra_body=eos)
    assert comp.id.startswith("cmpl-") and comp.object == "text_completion"
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 5
    ids = client.completions.create(model=MODEL, prompt=[504, 3622, 314], max_tokens=3)
    assert ids.usage.prompt_tokens == 3


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_not_streamed(
    server: Server, client: openai.OpenAI, kind: str
) -> None:
    common = dict(model=MODEL, temperature=0, max_tokens=10)
    if kind == "chat":
        msgs = [{"role": "user", "content": PROMPTS[1]}]
        full = client.chat.completions.create(messages=msgs, **common)
        chunks = list(
            client.chat.completions.create(
                messages=msgs, stream=True, stream_options={"include_usage": True}, **common
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        expected = full.choices[0].message.content
    else:
        full = client.completions.create(prompt=PROMPTS[2], **common)
        chunks = list(
            client.completions.create(
                prompt=PROMPTS[2], stream=True, stream_options={"include_usage": True}, **common
            )
        )
        texts = [c.choices[0].text for c in chunks if c.choices]
        expected = full.choices[0].text
    assert "".join(texts) == expected
    with_choices = [c for c in chunks if c.choices]
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert reasons[-1] == full.choices[0].finish_reason and not any(reasons[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == full.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_concurrent_streams_each_equal_solo(server: Server, client: openai.OpenAI) -> None:
    solo = {p: _chat(client, p).choices[0].message.content for p in PROMPTS}
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

    async def one(prompt: str) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=8,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run_all() -> list[str]:
        async with aclient:
            return await asyncio.gather(*(one(p) for p in PROMPTS * 2))

    outs = asyncio.run(run_all())
    assert outs == [solo[p] for p in PROMPTS * 2]


def _raw(server: Server, path: str, body: bytes | dict[str, Any]) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param", "needle"),
    [
        (CHAT, b'{"messages": [', None, "not valid JSON"),
        (CHAT, {"temperature": 0}, "messages", "`messages` is required"),
        (CHAT, {"messages": MSGS, "temperature": "hot"}, "temperature", "`temperature`"),
        (CHAT, {"messages": [{"content": "x"}]}, "messages", "`role`"),
        (COMP, {"prompt": "Hi", "max_tokens": 0}, "max_tokens", "`max_tokens` must be > 0, got 0"),
        (COMP, {"prompt": "Hi", "max_tokens": 9000}, "max_tokens", "context length is 8192"),
        (COMP, {"prompt": "Hi", "temperature": -0.5}, "temperature", "must be >= 0, got -0.5"),
        (CHAT, {"messages": MSGS, "top_p": 1.5}, "top_p", "`top_p` must be in (0, 1], got 1.5"),
        (CHAT, {"messages": MSGS, "top_p": 0}, "top_p", "`top_p` must be in (0, 1], got 0"),
        (COMP, {"prompt": ["a", "b"]}, "prompt", "only one prompt per request"),
        (COMP, {"prompt": [1, 10**9]}, "prompt", "outside the vocabulary"),
        (COMP, {"prompt": "Hi", "n": 2}, "n", "`n` must be 1, got 2"),
    ],
)
def test_bad_requests_get_400_and_server_keeps_serving(
    server: Server,
    client: openai.OpenAI,
    path: str,
    body: bytes | dict[str, Any],
    param: str | None,
    needle: str,
) -> None:
    r = _raw(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param and needle in err["message"], err
    _assert_alive(client)


def test_sdk_sees_context_model_and_key_errors(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad_len:
        client.completions.create(model=MODEL, prompt="Hello there", max_tokens=9000)
    msg = bad_len.value.body["message"]  # type: ignore[index]
    assert "8192" in msg and "9000 in the completion" in msg
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert nf.value.status_code == 404
    assert nf.value.body == {  # type: ignore[comparison-overlap]
        "message": f"The model `no-such-model` does not exist; this server serves `{MODEL}`",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert auth.value.status_code == 401 and auth.value.body["code"] == 401  # type: ignore[index]
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    _assert_alive(client)


def test_models_health_version_metrics(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json() == {"version": "test-1"}
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in (
        "outrider_requests_total",
        "outrider_generation_tokens_total",
        "outrider_time_to_first_token_seconds_bucket",
        "outrider_spec_decode_num_drafts_total",
        "outrider_spec_decode_num_accepted_tokens_total",
        "outrider_kv_cache_usage_ratio",
    ):
        assert name in r.text, name
    nf = httpx.get(f"{server.url}/v1/nope", headers={"Authorization": f"Bearer {API_KEY}"})
    assert nf.status_code == 404 and nf.json()["error"]["code"] == 404


def test_disconnect_frees_kv(server: Server, client: openai.OpenAI, llm: LLM) -> None:
    kv = llm.runner.kv
    body = {"prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}{COMP}", json=body, headers=headers) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [ln for ln in (next(lines) for _ in range(4)) if ln.startswith("data: ")]
        assert got and kv.num_used_blocks > 0
    _wait_for(lambda: kv.num_used_blocks == 0)

    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{COMP}", json=body, headers=headers, timeout=1.0)
    _wait_for(lambda: kv.num_used_blocks == 0)
    _assert_alive(client)


def test_overload_gets_503_with_retry_after(llm: LLM, server: Server) -> None:
    srv = _serve(llm, llm.async_engine(max_queued_requests=1, model_name="busy"))
    body = {"model": "busy", "prompt": "Tell me a story.", "max_tokens": 4, "ignore_eos": True}

    async def wave() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{srv.url}{COMP}", json=body) for _ in range(8)))

    try:
        busy: list[httpx.Response] = []
        for _ in range(3):
            rs = asyncio.run(wave())
            assert all(r.status_code in (200, 503) for r in rs)
            busy = [r for r in rs if r.status_code == 503]
            if busy:
                break
        assert busy, "no request was refused"
        assert int(busy[0].headers["retry-after"]) >= 1
        err = busy[0].json()["error"]
        assert err["code"] == 503 and "overloaded" in err["message"]
        sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        assert sdk.completions.create(model="busy", prompt="Hi", max_tokens=2).choices
    finally:
        srv.stop()


def test_bench_reports_throughput_latency_and_acceptance(server: Server, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a b c a b c a b c a b c a b c"}, {"messages": [MSGS[0]]}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    env = {**os.environ, "OUTRIDER_API_KEY": API_KEY}
    args = ["bench", "--url", server.url, "--concurrency", "3", "--num-prompts", "6"]
    args += ["--max-tokens", "12", "--prompts", str(prompts), "--ignore-eos"]
    r = subprocess.run(
        [OUTRIDER, *args, "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["num_ok"] == 6 and rep["num_failed"] == 0 and rep["output_tokens"] == 72
    assert rep["request_throughput"] > 0 and rep["output_throughput"] > 0
    assert all(v is not None and v > 0 for v in rep["ttft_ms"].values())
    assert all(v is not None for v in rep["itl_ms"].values())
    assert rep["num_drafts"] > 0 and rep["acceptance_length"] >= 1.0

    report = asyncio.run(
        bench.run_bench(
            server.url,
            concurrency=2,
            num_prompts=2,
            prompts=bench.load_prompts(None),
            max_tokens=4,
            api_key=API_KEY,
        )
    )
    text = report.render()
    for needle in ("req/s", "tok/s", "TTFT ms:", "p99", "ITL ms:", "acceptance length:"):
        assert needle in text


def test_dead_engine_gives_stream_error_then_503(
    tiny_model: Callable[..., tuple[Path, Any]],
) -> None:
    path, _ = tiny_model("llama")
    tiny = LLM(load_config(None, {"target": {"model": {"path": str(path)}}}))
    inner = tiny.async_engine().call
    calls = 0

    async def flaky(call: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 4:
            raise RuntimeError("worker lost")
        return await inner(call)

    engine = AsyncEngine(tiny.engine, flaky, model_name="tiny")
    srv = _serve(tiny, engine, vocab_size=tiny.runner.hf_config.vocab_size)
    sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError, match="no tokenizer"):
            sdk.completions.create(model="tiny", prompt="text", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="no tokenizer"):
            sdk.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
        stream = sdk.completions.create(
            model="tiny",
            prompt=[5, 6, 7],
            max_tokens=50,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        with pytest.raises(openai.APIError, match="worker lost"):
            for _ in stream:
                pass
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "worker lost" in health.json()["error"]["message"]
        with pytest.raises(openai.InternalServerError) as exc:
            sdk.completions.create(model="tiny", prompt=[5, 6], max_tokens=2)
        assert exc.value.status_code == 503
        assert exc.value.body["type"] == "ServiceUnavailableError"  # type: ignore[index]
    finally:
        srv.stop()
