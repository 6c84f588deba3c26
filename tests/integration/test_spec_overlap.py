"""Overlap end to end: metrics and round timing, the router's concurrent gRPC calls, refusals.

Losslessness of the overlapped loop for every drafter is in test_spec_lossless.py and
test_spec_sampled.py; here the served path runs the target in this process and the drafter in
another, so the router's two calls of a round really run at the same time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.cluster.router import Router
from outrider.cluster.rpc import WorkerClient
from outrider.workers.config import (
    CacheConfig,
    ConfigError,
    ModelConfig,
    SamplingParams,
    WorkerConfig,
)
from outrider.workers.models.loader import load_hf_config
from outrider.workers.proposers.factory import resolve_speculative
from outrider.workers.rpc_server import WorkerServer
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.worker import TargetWorker, WorkerHandler

PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [40, 41, 42],
    [9, 10, 11, 12, 13, 14, 15, 9, 10, 11, 12, 13, 14, 15, 9, 10],
    [70],
]
GREEDY = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)


def _target(path: object) -> WorkerConfig:
    return WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"), cache=CacheConfig(block_size=4)
    )


def _spec(draft: object, **kw: object) -> SpeculativeConfig:
    return SpeculativeConfig(
        method="draft_model",
        model=str(draft),
        num_speculative_tokens=3,
        cache=CacheConfig(block_size=4),
        **kw,  # type: ignore[arg-type]
    )


def _plain(path: object) -> list[list[int]]:
    llm = LLM(OutriderConfig(target=_target(path)))
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _metric(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_metrics_count_hits_and_split_round_time(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    llm = LLM(OutriderConfig(target=_target(path), speculative=_spec(path, overlap=True)))

    async def run() -> list[list[int]]:
        engine = llm.async_engine()

        async def one(prompt: list[int]) -> list[int]:
            return [t async for chunk in engine.generate(prompt, GREEDY) for t in chunk.token_ids]

        outs = await asyncio.gather(*(one(p) for p in PROMPTS))
        text = engine.metrics.render().decode()
        await engine.stop()
        hits = _metric(text, "outrider_spec_decode_overlap_hits_total")
        assert hits == llm.engine.stats.num_overlap_hits > 0
        for part in ("draft", "verify", "overhead"):
            assert _metric(text, f"outrider_spec_decode_round_{part}_seconds_count") > 0
        assert _metric(text, "outrider_spec_decode_draft_length") == 3
        return list(outs)

    assert asyncio.run(run()) == _plain(path)
    stats = llm.engine.stats
    # in process the two calls of an overlap run in turn: both count on the critical path
    assert stats.draft_s > 0 and stats.verify_s > 0 and stats.overhead_s >= 0
    assert stats.wall_s == pytest.approx(stats.draft_s + stats.verify_s + stats.overhead_s)


def test_serial_round_time_adds_up(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    llm = LLM(OutriderConfig(target=_target(path), speculative=_spec(path)))
    llm.generate(PROMPTS, GREEDY)
    stats = llm.engine.stats
    assert stats.num_overlap_hits == stats.num_overlap_misses == 0
    assert stats.wall_s == pytest.approx(stats.draft_s + stats.verify_s + stats.overhead_s)
    assert 0 < stats.overhead_s < stats.wall_s


def test_overlap_refused_for_drafters_that_need_hidden_states(  # type: ignore[no-untyped-def]
    tiny_model, tmp_path: Path, eagle3_helpers: ModuleType
) -> None:
    helpers = eagle3_helpers
    target, _ = tiny_model("llama")
    cfg = helpers.layer_config("llama")
    ckpt = helpers.write_checkpoint(
        tmp_path / "eagle3",
        helpers.random_tensors(cfg, num_aux=2),
        cfg,
        aux_ids=[1, 3],
        dtype=torch.float64,
    )
    speculative = SpeculativeConfig(model=str(ckpt), num_speculative_tokens=3, overlap=True)
    with pytest.raises(ConfigError, match=r"`speculative.overlap` needs a drafter that drafts"):
        LLM(OutriderConfig(target=_target(target), speculative=speculative))


DRAFTER_SERVER = """
import asyncio, sys
from outrider.workers.config import CacheConfig, ModelConfig, WorkerConfig
from outrider.workers.proposers.factory import resolve_speculative
from outrider.workers.rpc_server import WorkerServer
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.worker import DrafterWorker, WorkerHandler

async def main(target, draft):
    cfg = WorkerConfig(model=ModelConfig(path=target, dtype="float64"),
                       cache=CacheConfig(block_size=4))
    spec = resolve_speculative(SpeculativeConfig(
        method="draft_model", model=draft, num_speculative_tokens=3,
        cache=CacheConfig(block_size=4), overlap=True))
    worker = DrafterWorker(spec, cfg, target_vocab_size=96, target_num_layers=4,
                           target_moe_backend="torch", drafter_num_layers=None)
    handler = WorkerHandler(worker, tensor_parallel_size=1, pipeline_parallel_size=1,
                            devices=["cpu"], node_ids=["drafter"])
    server = WorkerServer(handler.handle, token="t")
    print(await server.start(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("drafter", ["self", "dense"])
def test_router_runs_verify_and_propose_together_over_grpc(drafter: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    draft = path if drafter == "self" else tiny_model("qwen3", seed=5)[0]
    spec = _spec(draft, overlap=True)
    target = TargetWorker(_target(path), num_layers=4)
    handler = WorkerHandler(
        target, tensor_parallel_size=1, pipeline_parallel_size=1, devices=["cpu"], node_ids=["t"]
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", DRAFTER_SERVER, str(path), str(draft)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    async def run() -> tuple[list[list[int]], tuple[int, int]]:
        server = WorkerServer(handler.handle, token="t")
        address = await server.start()
        assert proc.stdout is not None
        drafter_address = (await asyncio.to_thread(proc.stdout.readline)).strip()
        router = Router(OutriderConfig(target=_target(path), speculative=spec))
        router.target = WorkerClient(address, "t", group="target")
        router.drafter = WorkerClient(drafter_address, "t", group="drafter")
        router.target_desc = await router.target.describe()
        router.drafter_desc = await router.drafter.describe()
        router._hf = load_hf_config(str(path))
        engine = router._build_engine(resolve_speculative(spec))
        assert engine.core.overlap and engine.core.concurrent_overlap
        try:

            async def one(prompt: list[int]) -> list[int]:
                chunks = engine.generate(prompt, GREEDY)
                return [t async for chunk in chunks for t in chunk.token_ids]

            outs = list(await asyncio.gather(*(one(p) for p in PROMPTS)))
            stats = engine.core.stats
            return outs, (stats.num_overlap_hits, stats.num_overlap_misses)
        finally:
            await engine.stop()
            await router.target.close()
            await router.drafter.close()
            await server.stop()

    try:
        outs, (hits, misses) = asyncio.run(run())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)
    assert outs == _plain(path)
    if drafter == "self":
        assert hits > 0 and misses == 0  # every round after the prefill used prepared drafts
    else:
        assert misses > 0
    assert target.runner.kv.num_used_blocks == 0
