"""Target and drafter as separate Ray actor groups over gRPC (a real local Ray cluster)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from outrider.cluster.config import load_config
from outrider.cluster.llm import LLM
from outrider.cluster.router import Router
from outrider.workers.config import SamplingParams

PROMPTS = [[5, 6, 7, 8], [9, 10], [20, 21, 22, 23, 24, 25, 26]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=8,
        include_dashboard=False,
        logging_level=logging.WARNING,
        resources={"target_pool": 4, "draft_pool": 4},
    )
    yield
    ray.shutdown()


def _config(path: object, **over: Any) -> dict[str, Any]:
    target = {
        "model": {"path": str(path), "dtype": "float64"},
        "cache": {"block_size": 4},
        "device": "cpu",
        "pool": {"resource": "target_pool"},
    }
    for key, value in over.pop("target", {}).items():
        target[key] = value
    cfg: dict[str, Any] = {"target": target, **over}
    if "speculative" in cfg:
        cfg["speculative"] = {
            "device": "cpu",
            "pool": {"resource": "draft_pool"},
            **cfg["speculative"],
        }
    return cfg


def _serve(cfg: dict[str, Any]) -> tuple[list[list[int]], dict[str, Any], Any]:
    async def main() -> tuple[list[list[int]], dict[str, Any], Any]:
        router = Router(load_config(None, cfg))
        await router.start()
        try:
            assert router.engine is not None
            engine = router.engine

            async def one(prompt: list[int]) -> list[int]:
                out: list[int] = []
                async for chunk in engine.generate(prompt, PARAMS):
                    out += chunk.token_ids
                return out

            outs = await asyncio.gather(*(one(p) for p in PROMPTS))
            desc = await router.describe()
            return list(outs), desc, engine.core.stats.spec
        finally:
            await router.shutdown()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def reference(tiny_model) -> dict[str, list[list[int]]]:  # type: ignore[no-untyped-def]
    out = {}
    for kind in ("llama", "qwen3_moe"):
        path, _ = tiny_model(kind)
        cfg = load_config(None, _config(path))
        out[kind] = [o.token_ids for o in LLM(cfg).generate(PROMPTS, PARAMS)]
    return out


def test_tp2_target_with_tp1_drafter(ray_cluster, tiny_model, reference) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    cfg = _config(
        path,
        target={"parallel": {"tensor_parallel_size": 2}},
        speculative={"method": "draft_model", "model": str(path), "num_speculative_tokens": 3},
    )
    outs, desc, spec = _serve(cfg)
    assert outs == reference["llama"]
    assert desc["target"]["tensor_parallel_size"] == 2
    assert len(set(desc["target_placement"]["pids"])) == 2
    assert spec.num_drafts > 0 and spec.num_accepted_tokens == spec.num_draft_tokens


def test_pp2_target_plain(ray_cluster, tiny_model, reference) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    outs, desc, _ = _serve(_config(path, target={"parallel": {"pipeline_parallel_size": 2}}))
    assert outs == reference["llama"]
    assert desc["target"]["pipeline_parallel_size"] == 2
    assert "drafter" not in desc


def test_groups_are_disjoint_with_their_own_moe_backends(
    ray_cluster, tiny_model, reference
) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("qwen3_moe")
    cfg = _config(
        path,
        target={"kernels": {"moe_backend": "torch"}},
        speculative={
            "method": "draft_model",
            "model": str(path),
            "num_speculative_tokens": 2,
            "moe_backend": "torch_loop",
        },
    )
    outs, desc, _ = _serve(cfg)
    assert outs == reference["qwen3_moe"]
    t, d = desc["target_placement"], desc["drafter_placement"]
    assert t["placement_group_id"] != d["placement_group_id"]
    assert not set(t["pids"]) & set(d["pids"])
    # every bundle holds one unit of its own pool's resource and nothing of the other's
    assert all(b.get("target_pool") == 1 and "draft_pool" not in b for b in t["bundles"].values())
    assert all(b.get("draft_pool") == 1 and "target_pool" not in b for b in d["bundles"].values())
    assert desc["target"]["moe_backend"] == "torch"
    assert desc["drafter"]["moe_backend"] == "torch_loop"
