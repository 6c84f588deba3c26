"""``outrider bench``: bounded-concurrency streaming load against an OpenAI-compatible server.

TTFT and inter-token latency come from stream chunk arrival times; a chunk that carries several
tokens (an accepted draft block) counts as several tokens, using the per-chunk usage the server
reports. The acceptance length comes from the change in the server's speculative-decoding
counters over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from outrider.cluster.cli import _EXTRA_COMMANDS, CliError

DRAFTS = "outrider_spec_decode_num_drafts_total"
ACCEPTED = "outrider_spec_decode_num_accepted_tokens_total"
PERCENTILES = (50, 90, 99)

BUILTIN_PROMPTS = (
    "Explain in simple terms how a rainbow forms.",
    "Write a short poem about the sea at night.",
    "List three tips for writing clean Python code.",
    "What is the capital of France, and what is it famous for?",
    "Describe the water cycle in a few sentences.",
    "Give a recipe for a simple tomato pasta.",
    "Why is the sky blue? Answer briefly.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the benefits of regular exercise?",
    "Count from one to twenty in words.",
    "Explain what a hash table is to a new programmer.",
    "Write a friendly email inviting a colleague to lunch.",
)


@dataclass
class BenchRequest:
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0


@dataclass
class BenchReport:
    num_requests: int
    num_ok: int
    num_failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    output_tokens: int
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    num_drafts: float | None
    num_accepted_tokens: float | None
    acceptance_length: float | None
    first_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        def pcts(d: dict[str, float | None]) -> str:
            return "  ".join(f"{k} {_fmt(v)}" for k, v in d.items())

        al = "n/a" if self.acceptance_length is None else f"{self.acceptance_length:.3f}"
        lines = [
            f"requests:           {self.num_ok} ok, {self.num_failed} failed "
            f"in {self.duration_s:.2f} s",
            f"request throughput: {self.request_throughput:.3f} req/s",
            f"output throughput:  {self.output_throughput:.2f} tok/s ({self.output_tokens} tokens)",
            f"TTFT ms:            {pcts(self.ttft_ms)}",
            f"ITL ms:             {pcts(self.itl_ms)}",
            f"acceptance length:  {al}",
        ]
        if self.acceptance_length is not None:
            lines[-1] += f" (drafts {self.num_drafts:.0f}, accepted {self.num_accepted_tokens:.0f})"
        if self.first_error:
            lines.append(f"first error:        {self.first_error}")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _pcts_ms(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in PERCENTILES:
        v = percentile(values, q)
        out[f"p{q}"] = None if v is None else v * 1000.0
    return out


def load_prompts(path: str | None) -> list[BenchRequest]:
    if path is None:
        return [BenchRequest(prompt=p) for p in BUILTIN_PROMPTS]
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise CliError(f"cannot read --prompts {path}: {e.strerror}") from None
    out: list[BenchRequest] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{no}: not valid JSON: {e.msg}") from None
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            out.append(BenchRequest(messages=rec["messages"]))
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            out.append(BenchRequest(prompt=rec["prompt"]))
        else:
            raise CliError(f'{path}:{no}: expected an object with "prompt" (string) or "messages"')
    if not out:
        raise CliError(f"--prompts {path} holds no prompts")
    return out


def parse_counters(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in (DRAFTS, ACCEPTED):
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


async def _scrape(client: Any, url: str) -> dict[str, float] | None:
    try:
        r = await client.get(f"{url}/metrics")
    except Exception:
        return None
    return parse_counters(r.text) if r.status_code == 200 else None


def _error_message(body: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


async def _one(client: Any, url: str, req: BenchRequest, base: dict[str, Any]) -> RequestResult:
    if req.messages is not None:
        path, body = "/v1/chat/completions", {**base, "messages": req.messages}
    else:
        path, body = "/v1/completions", {**base, "prompt": req.prompt}
    res = RequestResult(ok=False)
    t0 = t_last = time.perf_counter()
    seen = 0
    try:
        async with client.stream("POST", f"{url}{path}", json=body) as resp:
            if resp.status_code != 200:
                res.error = _error_message(await resp.aread(), resp.status_code)
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"stream error: {obj['error'].get('message')}"
                    return res
                usage = obj.get("usage") or {}
                choices = obj.get("choices") or []
                if not choices:
                    res.output_tokens = int(usage.get("completion_tokens", seen))
                    continue
                choice = choices[0]
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                total = usage.get("completion_tokens")
                n = total - seen if total is not None else int(bool(text))
                if n <= 0:
                    continue
                now = time.perf_counter()
                if res.ttft is None:
                    res.ttft = now - t0
                else:
                    res.itl.extend([(now - t_last) / n] * n)
                t_last, seen = now, seen + n
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.output_tokens = max(res.output_tokens, seen)
    res.ok = True
    return res


async def run_bench(
    url: str,
    *,
    concurrency: int,
    num_prompts: int,
    prompts: list[BenchRequest],
    max_tokens: int,
    model: str | None = None,
    api_key: str | None = None,
    temperature: float = 0.0,
    ignore_eos: bool = False,
) -> BenchReport:
    import httpx

    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2)
    timeout = httpx.Timeout(None, connect=10.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        if model is None:
            try:
                r = await client.get(f"{url}/v1/models")
            except httpx.HTTPError as e:
                raise CliError(f"cannot reach {url}: {e}") from None
            if r.status_code != 200:
                raise CliError(f"GET {url}/v1/models: {_error_message(r.content, r.status_code)}")
            model = str(r.json()["data"][0]["id"])
        base: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if ignore_eos:
            base["ignore_eos"] = True
        before = await _scrape(client, url)
        queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
        for i in range(num_prompts):
            queue.put_nowait(prompts[i % len(prompts)])
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                results.append(await _one(client, url, queue.get_nowait(), base))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, num_prompts))))
        duration = time.perf_counter() - t0
        after = await _scrape(client, url)
    return _report(results, duration, before, after)


def _report(
    results: list[RequestResult],
    duration: float,
    before: dict[str, float] | None,
    after: dict[str, float] | None,
) -> BenchReport:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    drafts = accepted = al = None
    if before is not None and after is not None:
        drafts = after.get(DRAFTS, 0.0) - before.get(DRAFTS, 0.0)
        accepted = after.get(ACCEPTED, 0.0) - before.get(ACCEPTED, 0.0)
        al = 1.0 + accepted / drafts if drafts > 0 else None
    errors = [r.error for r in results if not r.ok]
    return BenchReport(
        num_requests=len(results),
        num_ok=len(ok),
        num_failed=len(errors),
        duration_s=duration,
        request_throughput=len(ok) / duration if duration > 0 else 0.0,
        output_throughput=tokens / duration if duration > 0 else 0.0,
        output_tokens=tokens,
        ttft_ms=_pcts_ms([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=_pcts_ms([x for r in ok for x in r.itl]),
        num_drafts=drafts,
        num_accepted_tokens=accepted,
        acceptance_length=al,
        first_error=errors[0] if errors else None,
    )


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise CliError(f"{name} must be >= 1, got {value}")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    report = asyncio.run(
        run_bench(
            args.url,
            concurrency=_positive("--concurrency", args.concurrency),
            num_prompts=_positive("--num-prompts", args.num_prompts),
            prompts=load_prompts(args.prompts),
            max_tokens=_positive("--max-tokens", args.max_tokens),
            model=args.model,
            api_key=args.api_key,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
        )
    )
    if report.num_ok == 0:
        raise CliError(f"all {report.num_requests} requests failed; first: {report.first_error}")
    print(json.dumps(report.to_dict()) if args.json else report.render())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test an OpenAI-compatible server")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--num-prompts", type=int, default=64, help="requests in total")
    p.add_argument("--prompts", help='JSONL file: {"prompt": ...} or {"messages": [...]} a line')
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", help="model name (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("OUTRIDER_API_KEY"))
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_bench)


_EXTRA_COMMANDS.append(add_parser)
