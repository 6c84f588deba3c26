"""outrider next to vLLM 0.26 at the same shapes, random weights and synthetic acceptance.

Both sides run the peer's model configs (../shared/peers/vllm: ``tgt`` = Llama-3.1-8B shape,
``moe`` = Qwen3-30B-A3B shape, their ``eagle3`` / ``peagle`` / ``moe_eagle3`` drafters) with
random weights, k = 4 and per-position synthetic acceptance 0.72/0.50/0.33/0.22, and time the
same thing peer.py times: prompts of 128 random token ids, greedy, ``ignore_eos``;
``ms = (t(bs, N + 1) - t(bs, 1)) / N`` (N = 256), i.e. ms per token at batch 1 and ms per step
at batch 8. Speculative rows are *synthetic*: accepted drafts are not compared with the
target's tokens.

    python3 benchmarks/bench_peer.py --side both      # outrider, then vLLM, per case
    python3 benchmarks/bench_peer.py --side outrider  # no vLLM needed
    python3 benchmarks/bench_peer.py --smoke          # CPU, tiny shapes, outrider only
    python3 benchmarks/bench_peer.py --merge a.json b.json  # one table from split runs

outrider: the target is built on cuda:0 by ``random_init`` (nothing on disk); the drafter, a
random speculators checkpoint written to a temporary folder, runs on cuda:1 when two GPUs are
visible (else cuda:0; ``--drafter-device``). Each case runs in a fresh process. vLLM: each case
is ``python3 <peer-dir>/peer.py MODE TARGET`` with /tmp/site on PYTHONPATH (docs/benchmarks.md
says how to stage it); peer.py measures batch 1 and 8 only. Writes a markdown table to stdout
and JSON to ``--json`` (default $OUT/bench_peer.json when OUT is set, else bench_peer.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED_PEER = REPO.parent / "shared" / "peers" / "vllm"
RATES = (0.72, 0.50, 0.33, 0.22)
K = len(RATES)
# NOTE: the peer's shapes and the modes peer.py runs on each (moe has no P-EAGLE config).
MODES: dict[str, tuple[str, ...]] = {
    "tgt": ("plain", "eagle3", "peagle"),
    "moe": ("plain", "eagle3"),
}
SHAPE_NAMES = {"tgt": "Llama-3.1-8B", "moe": "Qwen3-30B-A3B"}
PEER_BATCHES = (1, 8)
PEER_TOKENS = 256
PROMPT_LEN = 128
PROMPT_ID_HI = 128000
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 16  # peer.py's; outrider raises it to the largest batch asked for
MAX_BATCH = 64
# Smoke: tiny shapes (the peer's configs shrunk), few tokens.
SMOKE_LAYER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
}
SMOKE_TARGET = {
    **SMOKE_LAYER,
    "num_hidden_layers": 4,
    "moe_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SMOKE_DRAFTER = {
    "draft_vocab_size": 128,
    "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
    "mask_token_id": 3,
}
_PEER_LINE = re.compile(
    r"^\[(?P<target>\S+) (?P<mode>\S+)\] batch (?P<batch>\d+): (?P<ms>[\d.]+) ms per step-token"
    r".*TTFT~(?P<ttft>\d+) ms"
)


class BenchError(RuntimeError):
    """A one-line reason the benchmark cannot run."""


@dataclass(frozen=True)
class Case:
    target: str  # "tgt" | "moe"
    mode: str  # "plain" | "eagle3" | "peagle"


@dataclass(frozen=True)
class Settings:
    config_dir: str  # folder holding the peer's tgt/eagle3/peagle/moe/moe_eagle3 configs
    batch_sizes: tuple[int, ...]
    num_tokens: int
    prompt_len: int
    smoke: bool
    drafter_device: str | None
    attention_backend: str
    moe_backend: str
    cache_gib: float
    draft_length_policy: str = "fixed"


@dataclass
class Result:
    case: Case
    side: str  # "outrider" | "vllm"
    ms: dict[int, float] = field(default_factory=dict)  # batch -> ms per step
    ttft_ms: dict[int, float] = field(default_factory=dict)
    acceptance_length: dict[int, float | None] = field(default_factory=dict)
    # batch -> per-round means of the timed run: rounds, wall/draft/verify/overhead ms, mean k
    split: dict[int, dict[str, float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def draft_folder(case: Case) -> str:
    """The peer's drafter config folder of a case (as peer.py names it)."""
    return case.mode if case.target == "tgt" else f"{case.target}_{case.mode}"


def load_config(config_dir: str | Path, name: str) -> dict[str, Any]:
    path = Path(config_dir) / name / "config.json"
    if not path.is_file():
        raise BenchError(f"no peer model config at {path}")
    return json.loads(path.read_text())


def smoke_target(config: dict[str, Any]) -> dict[str, Any]:
    keys = set(SMOKE_TARGET) if config.get("model_type") == "qwen3_moe" else set(SMOKE_LAYER)
    keys.update(("num_hidden_layers", "bos_token_id", "eos_token_id"))
    return {**config, **{k: v for k, v in SMOKE_TARGET.items() if k in keys}}


def smoke_drafter(config: dict[str, Any]) -> dict[str, Any]:
    layer = {**config["transformer_layer_config"], **SMOKE_LAYER}
    out = {**config, **SMOKE_DRAFTER, "transformer_layer_config": layer}
    if "mask_token_id" not in config:
        out.pop("mask_token_id")
    return out


# -- outrider side --------------------------------------------------------------------------
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
    run(1, 8)
    for bs in s.batch_sizes:
        # NOTE: CUDA graphs are captured on first use; vLLM captures its own at start-up.
        run(bs, 8)
        t1, _ = run(bs, 1)
        before = split_totals(llm.engine.stats)
        tn, al = run(bs, s.num_tokens + 1)
        result.split[bs] = split_means(before, split_totals(llm.engine.stats))
        result.ms[bs] = (tn - t1) / s.num_tokens * 1e3
        result.ttft_ms[bs] = t1 * 1e3
        result.acceptance_length[bs] = al
    return result


def split_totals(stats: Any) -> dict[str, float]:
    k_sum = sum(k * n for k, n in stats.rounds_by_k.items())
    return {
        "rounds": float(stats.num_rounds),
        "wall": stats.wall_s,
        "draft": stats.draft_s,
        "verify": stats.verify_s,
        "overhead": stats.overhead_s,
        "k": float(k_sum),
    }


def split_means(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    n = b["rounds"] - a["rounds"]
    if n <= 0:
        return {"rounds": 0.0}
    out = {"rounds": n, "mean_k": (b["k"] - a["k"]) / n}
    for key in ("wall", "draft", "verify", "overhead"):
        out[f"{key}_ms"] = (b[key] - a[key]) / n * 1e3
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


# -- vLLM side --------------------------------------------------------------------------------
def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = "/tmp/site" + (f":{old}" if old else "")
    return env


def check_vllm(peer_dir: Path, python: str) -> None:
    script = peer_dir / "peer.py"
    how = (
        "stage it as docs/benchmarks.md says (python3 ../shared/devicekit/stage.py vllm==0.26.0 "
        "... --out .devkit-vl, then copy ../shared/peers/vllm/* into .devkit-vl/)"
    )
    if not script.is_file():
        raise BenchError(f"vLLM is not staged: {script} does not exist; {how}")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    r = subprocess.run([python, "-c", probe], env=peer_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"vLLM is not importable by {python} with /tmp/site on PYTHONPATH; {how}")


def parse_peer(text: str, case: Case) -> Result:
    result = Result(case, "vllm")
    for line in text.splitlines():
        m = _PEER_LINE.match(line.strip())
        if m is None:
            continue
        bs = int(m["batch"])
        result.ms[bs] = float(m["ms"])
        result.ttft_ms[bs] = float(m["ttft"])
    return result


def run_vllm(case: Case, peer_dir: Path, python: str) -> Result:
    cmd = [python, str(peer_dir / "peer.py"), case.mode, case.target]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=peer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("["):
            print(f"  vllm: {line.rstrip()}", file=sys.stderr, flush=True)
    rc = proc.wait()
    text = "".join(lines)
    if rc != 0:
        tail = "".join(lines[-20:])
        raise BenchError(f"{' '.join(cmd)} exited with {rc}; last lines:\n{tail}")
    result = parse_peer(text, case)
    if not result.ms:
        raise BenchError(f"no timing lines in the output of {' '.join(cmd)}:\n{text[-2000:]}")
    result.info["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


# -- report ----------------------------------------------------------------------------------
def mode_label(mode: str) -> str:
    return mode if mode == "plain" else f"{mode} synthetic"


def _fmt(ms: float | None, bs: int, plain: float | None) -> str:
    if ms is None:
        return "-"
    s = f"{ms:.2f} ({bs * 1000 / ms:.0f} tok/s"
    if plain is not None and ms > 0:
        s += f", {plain / ms:.2f}x"
    return s + ")"


def table(results: Sequence[Result], batch_sizes: Sequence[int]) -> tuple[str, list[dict]]:
    """The markdown table and its rows (one per shape, mode and batch size)."""
    by = {(r.side, r.case.target, r.case.mode): r for r in results}
    cases = list(dict.fromkeys(r.case for r in results))
    lines = [
        "| shape | mode | batch | outrider ms/step (agg tok/s, x plain) | "
        "vLLM ms/step (agg tok/s, x plain) | vLLM / outrider | outrider AL |",
        "|---|---|---|---|---|---|---|",
    ]
    rows: list[dict] = []
    for c in cases:
        for bs in batch_sizes:
            row: dict[str, Any] = {"shape": c.target, "mode": c.mode, "batch": bs}
            cells = []
            for side in ("outrider", "vllm"):
                r = by.get((side, c.target, c.mode))
                p = by.get((side, c.target, "plain"))
                ms = r.ms.get(bs) if r is not None else None
                plain = p.ms.get(bs) if p is not None and c.mode != "plain" else None
                row[f"{side}_ms"] = ms
                row[f"{side}_speedup_vs_plain"] = plain / ms if plain and ms else None
                cells.append(_fmt(ms, bs, plain))
            o, v = row["outrider_ms"], row["vllm_ms"]
            row["vllm_over_outrider"] = v / o if o and v else None
            ratio = f"{row['vllm_over_outrider']:.2f}" if row["vllm_over_outrider"] else "-"
            r_o = by.get(("outrider", c.target, c.mode))
            al = r_o.acceptance_length.get(bs) if r_o is not None else None
            row["outrider_acceptance_length"] = al
            lines.append(
                f"| {SHAPE_NAMES[c.target]} | {mode_label(c.mode)} | {bs} | {cells[0]} | "
                f"{cells[1]} | {ratio} | {'-' if al is None else f'{al:.2f}'} |"
            )
            rows.append(row)
    return "\n".join(lines), rows


def split_table(results: Sequence[Result], batch_sizes: Sequence[int]) -> str:
    """outrider's round time split (per-round means over the timed run)."""
    lines = [
        "| shape | mode | batch | rounds | mean k | round ms | draft ms | verify ms "
        "| overhead ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.side != "outrider":
            continue
        for bs in batch_sizes:
            sp = r.split.get(bs)
            if not sp or not sp.get("rounds"):
                continue
            lines.append(
                f"| {SHAPE_NAMES[r.case.target]} | {mode_label(r.case.mode)} | {bs} | "
                f"{sp['rounds']:.0f} | {sp['mean_k']:.2f} | {sp['wall_ms']:.2f} | "
                f"{sp['draft_ms']:.2f} | {sp['verify_ms']:.2f} | {sp['overhead_ms']:.2f} |"
            )
    return "\n".join(lines)


def caption(s: Settings, results: Sequence[Result]) -> str:
    rates = "/".join(f"{r:.2f}" for r in RATES)
    mine = [r for r in results if r.side == "outrider"]
    # NOTE: the first speculative run names the drafter's device (plain runs have none).
    first = mine[0].info if mine else {}
    ours = next((r.info for r in mine if r.info.get("drafter_device")), first)
    where = ""
    if ours:
        where = (
            f"; outrider target on {ours['target_device']}, drafter on "
            f"{ours.get('drafter_device') or ours['target_device']}, attention "
            f"{ours['attention_backend']}, MoE {ours['moe_backend']}, CUDA graphs "
            f"{'on' if ours['cuda_graphs'] else 'off'}, draft length "
            f"{s.draft_length_policy}"
        )
    return (
        f"Random weights; *synthetic* acceptance (rates {rates}, k={K}) on speculative rows; "
        f"{s.num_tokens} timed tokens per sequence after a {s.prompt_len}-token prompt; "
        f"ms/step = ms per token of each sequence (batch 1: ms/token){where}"
        + ("; SMOKE (tiny CPU shapes, not a measurement)" if s.smoke else "")
    )


# -- CLI -------------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", choices=("outrider", "vllm", "both"), default="both")
    ap.add_argument("--targets", default="tgt,moe", help="of tgt, moe")
    ap.add_argument("--modes", default="plain,eagle3,peagle", help="peagle runs on tgt only")
    ap.add_argument("--batch-sizes", default="1,8", help="peer.py measures 1 and 8 only")
    ap.add_argument("--tokens", type=int, default=None, help=f"timed tokens ({PEER_TOKENS})")
    ap.add_argument("--prompt-len", type=int, default=None, help=f"({PROMPT_LEN})")
    ap.add_argument("--peer-dir", default=".devkit-vl", help="staged peer.py and its configs")
    ap.add_argument("--vllm-python", default="python3")
    ap.add_argument("--drafter-device", default=None, help="default cuda:1 if 2 GPUs else cuda:0")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--moe-backend", default="auto")
    ap.add_argument("--draft-length-policy", choices=("fixed", "goodput"), default="fixed")
    ap.add_argument("--cache-gib", type=float, default=None, help="KV cache per group (4)")
    ap.add_argument("--json", default=None, help="JSON path (default $OUT/bench_peer.json)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, outrider only")
    ap.add_argument(
        "--merge", nargs="+", default=None, help="print one table from earlier runs' JSON files"
    )
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[list[Case], Settings]:
    targets, modes = _csv(args.targets), _csv(args.modes)
    for t in targets:
        if t not in MODES:
            raise BenchError(f"`--targets` must be of {', '.join(MODES)}, got {t!r}")
    for m in modes:
        if m not in MODES["tgt"]:
            raise BenchError(f"`--modes` must be of {', '.join(MODES['tgt'])}, got {m!r}")
    cases = [Case(t, m) for t in targets for m in modes if m in MODES[t]]
    if not cases:
        raise BenchError("no case to run: peagle runs on tgt only")
    batch_sizes = tuple(int(b) for b in _csv(args.batch_sizes))
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > MAX_BATCH:
        raise BenchError(f"`--batch-sizes` must be in [1, {MAX_BATCH}], got {args.batch_sizes}")
    peer_dir = Path(args.peer_dir)
    config_dir = peer_dir if (peer_dir / "tgt" / "config.json").is_file() else SHARED_PEER
    tokens = args.tokens or (8 if args.smoke else PEER_TOKENS)
    prompt_len = args.prompt_len or (16 if args.smoke else PROMPT_LEN)
    if tokens < 1 or prompt_len < 1:
        raise BenchError(f"`--tokens` and `--prompt-len` must be >= 1, got {tokens}, {prompt_len}")
    if prompt_len + tokens + 2 * K + 2 > MAX_MODEL_LEN:
        raise BenchError(f"prompt + tokens must fit max_model_len {MAX_MODEL_LEN}")
    settings = Settings(
        config_dir=str(config_dir),
        batch_sizes=batch_sizes,
        num_tokens=tokens,
        prompt_len=prompt_len,
        smoke=args.smoke,
        drafter_device=args.drafter_device,
        attention_backend=args.attention_backend,
        moe_backend=args.moe_backend,
        cache_gib=args.cache_gib or (0.02 if args.smoke else 4.0),
        draft_length_policy=args.draft_length_policy,
    )
    return cases, settings


def load_runs(paths: Sequence[str]) -> list[Result]:
    """The runs of earlier reports (a later file's run of the same side and case wins)."""
    runs: dict[tuple[str, Case], Result] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["runs"]:
            case = Case(r["shape"], r["mode"])
            res = Result(case, r["side"], info=r["info"])
            res.ms = {int(b): v for b, v in r["ms"].items()}
            res.ttft_ms = {int(b): v for b, v in r["ttft_ms"].items()}
            res.acceptance_length = {int(b): v for b, v in r["acceptance_length"].items()}
            res.split = {int(b): v for b, v in r.get("split", {}).items()}
            runs[(res.side, case)] = res
    return list(runs.values())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cases, s = resolve(args)
    if args.smoke:
        import torch

        # NOTE: tiny shapes on a shared CPU: more threads only contend.
        torch.set_num_threads(1)
    if args.merge:
        return report_out(args, s, load_runs(args.merge))
    side = "outrider" if args.smoke else args.side
    peer_dir = Path(args.peer_dir)
    if side in ("vllm", "both"):
        check_vllm(peer_dir, args.vllm_python)
        if s.batch_sizes != PEER_BATCHES or s.num_tokens != PEER_TOKENS:
            print(
                f"note: peer.py always measures batch {PEER_BATCHES} with {PEER_TOKENS} tokens",
                file=sys.stderr,
            )
        if s.prompt_len != PROMPT_LEN:
            raise BenchError(f"peer.py's prompts have {PROMPT_LEN} tokens: drop --prompt-len")
    results: list[Result] = []
    for c in cases:
        if side in ("outrider", "both"):
            print(f"outrider {c.target} {c.mode} ...", file=sys.stderr, flush=True)
            results.extend(run_outrider([c], s))
        if side in ("vllm", "both"):
            print(f"vllm {c.target} {c.mode} ...", file=sys.stderr, flush=True)
            results.append(run_vllm(c, peer_dir, args.vllm_python))
    return report_out(args, s, results)


def report_out(args: argparse.Namespace, s: Settings, results: list[Result]) -> dict[str, Any]:
    text, rows = table(results, s.batch_sizes)
    head = caption(s, results)
    print(head + "\n\n" + text + "\n\n" + split_table(results, s.batch_sizes))
    report = {
        "caption": head,
        "settings": asdict(s),
        "synthetic_acceptance_rates": list(RATES),
        "num_speculative_tokens": K,
        "rows": rows,
        "runs": [
            {
                "side": r.side,
                "shape": r.case.target,
                "mode": r.case.mode,
                "ms": r.ms,
                "ttft_ms": r.ttft_ms,
                "acceptance_length": r.acceptance_length,
                "split": r.split,
                "info": r.info,
            }
            for r in results
        ],
    }
    out = args.json or os.path.join(os.environ.get("OUT", "."), "bench_peer.json")
    Path(out).write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"bench_peer: {e}")
