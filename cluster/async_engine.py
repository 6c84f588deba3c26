"""AsyncEngine: continuous batching over EngineCore rounds, streaming per-request chunks.

One background task drives rounds while any request is unfinished; requests join between
rounds and leave when they finish, fail or are cancelled (a cancelled stream frees its KV at the
start of the next round). The target and drafter calls of a round are awaited through
``call``: gRPC clients for the served path, a thread for in-process workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from outrider.cluster.engine import Call, EngineCore
from outrider.cluster.metrics import EngineMetrics
from outrider.cluster.sequence import Sequence
from outrider.workers.config import ConfigError, SamplingParams

logger = logging.getLogger("outrider.engine")


class EngineOverloaded(RuntimeError):
    """More requests are waiting than the configured queue allows."""


class EngineDead(RuntimeError):
    """The engine loop stopped on an error; the message says which."""


@dataclass
class GenerationChunk:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class _Request:
    seq: Sequence
    queue: asyncio.Queue[GenerationChunk | BaseException] = field(default_factory=asyncio.Queue)
    t_start: float = field(default_factory=time.monotonic)
    t_last: float = 0.0


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        call: Callable[[Call], Awaitable[Any]],
        *,
        model_name: str,
        max_queued_requests: int = 256,
        kv_usage: Callable[[], float] | None = None,
        log_interval_s: float = 10.0,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.core = core
        self.call = call
        self.model_name = model_name
        self.max_queued_requests = max_queued_requests
        self.kv_usage = kv_usage or (lambda: 0.0)
        self.log_interval_s = log_interval_s
        self.metrics = metrics or EngineMetrics(model_name)
        self.metrics.set_synthetic(core.synthetic)
        self._requests: dict[int, _Request] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._last_log = time.monotonic()
        caps = core.drafter.capabilities if core.drafter is not None else None
        self._fallback_reason = caps.fallback_reason if caps is not None else None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def healthy(self) -> bool:
        return self._error is None and (self._task is None or not self._task.done())

    @property
    def error(self) -> BaseException | None:
        return self._error

    # -- requests -------------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        if self._error is not None:
            raise EngineDead(f"engine stopped: {self._error}")
        if self.core.scheduler.num_waiting >= self.max_queued_requests:
            raise EngineOverloaded(
                f"{self.core.scheduler.num_waiting} requests are waiting "
                f"(max_queued_requests={self.max_queued_requests})"
            )
        if not self.core.scheduler.fits_alone(len(prompt_token_ids) + params.max_tokens):
            raise ConfigError(
                f"the prompt ({len(prompt_token_ids)} tokens) plus max_tokens "
                f"({params.max_tokens}) exceeds the KV cache capacity"
            )
        seq = self.core.add_request(prompt_token_ids, params)
        req = _Request(seq)
        req.t_last = req.t_start
        self._requests[seq.seq_id] = req
        self.start()
        self._wake.set()
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._requests.pop(seq.seq_id, None)
            if not seq.is_finished:
                self.core.abort(seq)
                self._wake.set()

    # -- the loop -------------------------------------------------------------------------------
    async def _run_round(self) -> None:
        gen = self.core.round()
        try:
            call = next(gen)
            while True:
                if call[0] in ("propose", "overlap") and self._fallback_reason:
                    self.metrics.on_fallback_round(self._fallback_reason)
                call = gen.send(await self.call(call))
        except StopIteration as stop:
            outputs = stop.value
        now = time.monotonic()
        for out in outputs:
            seq = out.seq
            req = self._requests.get(seq.seq_id)
            if req is None:
                continue
            if seq.num_output_tokens == len(out.new_token_ids) and out.new_token_ids:
                self.metrics.on_first_token(now - req.t_start)
            else:
                self.metrics.on_tokens(len(out.new_token_ids), now - req.t_last)
            req.t_last = now
            if out.finished:
                self.metrics.on_finished(
                    seq.finish_reason or "stop", seq.num_prompt_tokens, now - req.t_start
                )
            req.queue.put_nowait(
                GenerationChunk(
                    out.new_token_ids,
                    out.new_text,
                    seq.finish_reason if out.finished else None,
                    seq.num_prompt_tokens,
                    seq.num_output_tokens,
                )
            )
        for seq_stats in self._round_spec(outputs):
            self.metrics.on_spec(*seq_stats)
        if outputs:
            t = self.core.last_timing
            self.metrics.on_round(
                t.k, t.draft_s, t.verify_s, t.overhead_s, t.overlap_hits, t.overlap_misses
            )

    @staticmethod
    def _round_spec(outputs: list[Any]) -> list[tuple[int, int]]:
        return [o.spec for o in outputs if o.spec is not None]

    def _observe_load(self) -> None:
        sched = self.core.scheduler
        usage = self.kv_usage()
        self.metrics.set_load(sched.num_running, sched.num_waiting, usage)
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s:
            self._last_log = now
            logger.info(self.metrics.log_line(sched.num_running, sched.num_waiting, usage))

    async def _loop(self) -> None:
        try:
            while True:
                if not self.core.has_unfinished():
                    self._observe_load()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._run_round()
                self._observe_load()
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("engine loop failed")
            self._error = e
            for req in self._requests.values():
                req.queue.put_nowait(EngineDead(f"engine stopped: {e}"))
