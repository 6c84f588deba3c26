"""bench_peer's outrider side: the in-process LLM at the peer's shapes, timed like peer.py."""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peer_common import (
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    PROMPT_ID_HI,
    RATES,
    BenchError,
    Case,
    K,
    Result,
    Settings,
    draft_folder,
    load_config,
    smoke_drafter,
    smoke_target,
)

from outrider.kernels.compile_log import CompileLog


def sync_devices(devices: Sequence[str]) -> None:
    import torch

    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def _devices(smoke: bool, drafter_device: str | None) -> tuple[str, str]:
    if smoke:
        return "cpu", "cpu"
    import torch

    if not torch.cuda.is_available():
        raise BenchError("no CUDA device here: run on the GPU machine, or pass --smoke")
    default = "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"
    return "cuda:0", drafter_device or default


def build_llm(case: Case, s: Settings, scratch: Path) -> tuple[Any, dict[str, Any]]:
    """outrider's in-process LLM for a case: random target, random speculators drafter."""
    from outrider.cluster.config import OutriderConfig, SchedulerConfig
    from outrider.cluster.llm import LLM
    from outrider.workers.config import CacheConfig, KernelConfig, ModelConfig, WorkerConfig
    from outrider.workers.models.random_init import random_builder
    from outrider.workers.models.random_speculators import write_random_eagle3
    from outrider.workers.spec_config import SpeculativeConfig

    target_device, drafter_device = _devices(s.smoke, s.drafter_device)
    dtype = "float32" if s.smoke else "bfloat16"
    tcfg = load_config(s.config_dir, case.target)
    if s.smoke:
        tcfg = smoke_target(tcfg)
    # NOTE: the target folder holds only the config: no tokenizer, so token ids in and out.
    tdir = scratch / case.target
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "config.json").write_text(json.dumps(tcfg))
    cache = CacheConfig(memory_gib=s.cache_gib)
    target = WorkerConfig(
        model=ModelConfig(path=str(tdir), dtype=dtype, max_model_len=MAX_MODEL_LEN),
        kernels=KernelConfig(
            attention_backend=s.attention_backend,  # type: ignore[arg-type]
            moe_backend=s.moe_backend,  # type: ignore[arg-type]
        ),
        cache=cache,
        device=target_device,
    )
    spec = None
    if case.mode != "plain":
        dcfg = load_config(s.config_dir, draft_folder(case))
        if s.smoke:
            dcfg = smoke_drafter(dcfg)
        ddir = write_random_eagle3(dcfg, scratch / draft_folder(case), device=drafter_device)
        spec = SpeculativeConfig(
            method="eagle3",
            model=str(ddir),
            num_speculative_tokens=K,
            parallel_drafting=case.mode == "peagle",
            verification="synthetic",
            synthetic_acceptance_rates=RATES,
            draft_length_policy=s.draft_length_policy,  # type: ignore[arg-type]
            cache=cache,
            device=drafter_device,
        )
    config = OutriderConfig(
        target=target,
        speculative=spec,
        scheduler=SchedulerConfig(max_num_seqs=max(MAX_NUM_SEQS, *s.batch_sizes)),
    )
    llm = LLM(config, target_build=random_builder(tcfg, seed=0))
    info = {
        "target_device": target_device,
        "drafter_device": drafter_device if spec is not None else None,
        "dtype": dtype,
        "attention_backend": llm.runner.attention_backend,
        "moe_backend": llm.runner.moe_backend,
        "cuda_graphs": llm.runner.graph_runner is not None,
        "draft_length_policy": s.draft_length_policy if spec is not None else None,
    }
    if llm.drafter is not None:
        caps = llm.drafter.capabilities
        info["parallel_drafting"] = caps.parallel_drafting
        info["fallback_reason"] = caps.fallback_reason
    return llm, info


def measure_outrider(case: Case, s: Settings) -> Result:
    """peer.py's measurement on outrider's LLM (plus a warm-up at each batch size)."""
    from outrider.workers.config import SamplingParams

    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        t0 = time.perf_counter()
        llm, info = build_llm(case, s, Path(tmp))
        info["build_s"] = round(time.perf_counter() - t0, 1)
    devices = [info["target_device"], info["drafter_device"] or info["target_device"]]
    hi = min(PROMPT_ID_HI, llm.runner.hf_config.vocab_size)
    rng = random.Random(0)

    def run(bs: int, n: int) -> tuple[float, float | None]:
        prompts = [[rng.randrange(3, hi) for _ in range(s.prompt_len)] for _ in range(bs)]
        params = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)
        sync_devices(devices)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync_devices(devices)
        dt = time.perf_counter() - t
        got = [len(o.token_ids) for o in outs]
        if got != [n] * bs:
            raise BenchError(f"{case}: asked for {n} tokens per sequence, got {got}")
        drafts = sum(o.spec.num_drafts for o in outs)
        accepted = sum(o.spec.num_accepted_tokens for o in outs)
        return dt, (1.0 + accepted / drafts) if drafts else None

    result = Result(case, "outrider", info=info)
    compiles = CompileLog()
    if not s.smoke:
        compiles.install()
    run(1, 8)
    for bs in s.batch_sizes:
        # NOTE: CUDA graphs are captured and Triton variants compiled on first use (vLLM does
        # both at start-up): one untimed run of the full length keeps them out of the timing.
        run(bs, s.num_tokens + 1)
        t1, _ = run(bs, 1)
        before = split_totals(llm.engine.stats)
        t_timed = time.perf_counter()
        tn, al = run(bs, s.num_tokens + 1)
        result.split[bs] = split_means(before, split_totals(llm.engine.stats))
        # NOTE: one-off work inside the timed run (a kernel variant met for the first time).
        result.split[bs]["compiles"] = compiles.since(t_timed)
        result.ms[bs] = (tn - t1) / s.num_tokens * 1e3
        result.ttft_ms[bs] = t1 * 1e3
        result.acceptance_length[bs] = al
    return result


def split_totals(stats: Any) -> dict[str, Any]:
    k_sum = sum(k * n for k, n in stats.rounds_by_k.items())
    return {
        "recent": list(stats.recent),
        "rounds": float(stats.num_rounds),
        "wall": stats.wall_s,
        "draft": stats.draft_s,
        "verify": stats.verify_s,
        "overhead": stats.overhead_s,
        "k": float(k_sum),
    }


SLOWEST = 3


def split_means(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per-round means between two ``split_totals``, with the median and the slowest rounds."""
    n = b["rounds"] - a["rounds"]
    if n <= 0:
        return {"rounds": 0.0}
    out: dict[str, Any] = {"rounds": n, "mean_k": (b["k"] - a["k"]) / n}
    for key in ("wall", "draft", "verify", "overhead"):
        out[f"{key}_ms"] = (b[key] - a[key]) / n * 1e3
    rounds = sorted(b["recent"][-int(n) :], key=lambda t: t.wall_s)
    if rounds:
        out["p50_ms"] = rounds[len(rounds) // 2].wall_s * 1e3
        out["max_ms"] = rounds[-1].wall_s * 1e3
        out["slowest"] = [
            {
                "ms": round(t.wall_s * 1e3, 2),
                "k": t.k,
                "seqs": t.num_seqs,
                "tokens": t.num_tokens,
                "draft_ms": round(t.draft_s * 1e3, 2),
                "verify_ms": round(t.verify_s * 1e3, 2),
                "captured": t.captured_graphs,
            }
            for t in rounds[::-1][:SLOWEST]
        ]
    return out


def run_outrider(cases: Sequence[Case], s: Settings) -> list[Result]:
    """Each case in a fresh process on the GPU (memory back between cases); in process else."""
    if s.smoke:
        return [measure_outrider(c, s) for c in cases]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    out = []
    for c in cases:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            out.append(pool.submit(measure_outrider, c, s).result())
    return out
