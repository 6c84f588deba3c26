"""The worker protocol over real gRPC on 127.0.0.1: results equal in-process calls."""

from __future__ import annotations

import asyncio

import pytest

from outrider.cluster.rpc import WorkerCallError, WorkerClient
from outrider.workers.config import CacheConfig, ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.proposers.base import ProposeItem
from outrider.workers.protocol import Delta
from outrider.workers.rpc_server import WorkerServer
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.verifier import VerifyItem
from outrider.workers.worker import DrafterWorker, TargetWorker, WorkerHandler


def _cfg(path: object) -> WorkerConfig:
    return WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"), cache=CacheConfig(block_size=4)
    )


def test_verify_propose_release_describe_over_grpc(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    target = TargetWorker(_cfg(path), num_layers=4)
    spec = SpeculativeConfig(method="draft_model", model=str(path), num_speculative_tokens=3)
    drafter = DrafterWorker(
        spec,
        _cfg(path),
        target_vocab_size=96,
        target_num_layers=4,
        target_moe_backend="torch",
        drafter_num_layers=None,
    )
    t_handler = WorkerHandler(
        target, tensor_parallel_size=1, pipeline_parallel_size=1, devices=["cpu"], node_ids=["n0"]
    )
    d_handler = WorkerHandler(
        drafter, tensor_parallel_size=1, pipeline_parallel_size=1, devices=["cpu"], node_ids=["n0"]
    )
    params = SamplingParams(temperature=0.0, max_tokens=8)

    async def main() -> None:
        ts = WorkerServer(t_handler.handle, token="secret")
        ds = WorkerServer(d_handler.handle, token="secret")
        t_addr, d_addr = await ts.start(), await ds.start()
        tc = WorkerClient(t_addr, "secret", group="target")
        dc = WorkerClient(d_addr, "secret", group="drafter")
        try:
            assert await tc.health()
            desc = await tc.describe()
            assert desc.role == "target" and desc.moe_backend == "torch"
            assert desc.kv.num_used_blocks == 0
            ddesc = await dc.describe()
            assert ddesc.capabilities is not None
            assert ddesc.capabilities.method == "draft_model"
            res = await tc.verify([VerifyItem(Delta(1, 0, [5, 6, 7, 8]), [], None, params)])
            first = res.output_token_ids[0]
            assert len(first) == 1
            prop = await dc.propose(
                [ProposeItem(Delta(1, 0, [5, 6, 7, 8, *first]), 3, None, params)],
                "sequential",
            )
            drafts = prop.draft_token_ids[0]
            assert len(drafts) == 3
            res2 = await tc.verify([VerifyItem(Delta(1, 4, first), drafts, None)])
            # the target drafting for itself accepts every draft
            assert res2.num_accepted == [3] and len(res2.output_token_ids[0]) == 4
            assert (await tc.describe()).kv.num_used_blocks > 0
            assert await tc.release([1]) == 1
            await dc.release([1])
            assert (await tc.describe()).kv.num_used_blocks == 0
            bad = WorkerClient(t_addr, "wrong", group="target")
            with pytest.raises(WorkerCallError, match="UNAUTHENTICATED"):
                await bad.describe()
            await bad.close()
            with pytest.raises(WorkerCallError, match="INVALID_ARGUMENT"):
                await dc.verify([VerifyItem(Delta(2, 0, [5]), [], None, params)])
            # NOTE: an error reply leaves the client's stream open; a missed deadline drops it
            # and the next call opens a new one.
            assert (await dc.describe()).role == "drafter"
            with pytest.raises(WorkerCallError, match="DEADLINE_EXCEEDED"):
                await tc.describe(timeout=1e-9)
            assert (await tc.describe()).role == "target"
        finally:
            await tc.close()
            await dc.close()
            await ts.stop()
            await ds.stop()

    asyncio.run(main())
