"""Tune the skinny GEMM against cuBLAS at the peers' projection shapes; write the dispatch table.

    python benchmarks/gpu_skinny.py                 # sweep, print, write $OUT/<device>.json
    python benchmarks/gpu_skinny.py --quick         # fewer tile candidates
    python benchmarks/gpu_skinny.py --smoke         # no GPU: two tiny shapes, interpreter
    python benchmarks/gpu_skinny.py --rows 1 --shapes 8b. --merge TABLE  # re-sweep a part of TABLE

For each projection shape (Llama-3.1-8B, Qwen3-30B-A3B and their EAGLE-3 heads), each prologue
the layers fuse there (none; RMSNorm with and without the residual add before q/k/v and
gate_up; SiLU·up before down) and each row bucket (1, 2, 4, 8, 16 rows), it times

- the baseline the layers run without the table: the prologue's own Triton launch
  (``kernels/fused``) followed by ``F.linear`` (cuBLAS);
- the skinny GEMM at every candidate tile config,

as CUDA-graph replays rotating over enough weight copies that nothing is served from L2, and
checks the best config against the reference. A table entry says ``use: true`` only where the
kernel beat the baseline by more than 2%. The table goes to
``kernels/fused/skinny_gemm_configs/<device>.json`` once committed; ``OUTRIDER_SKINNY_GEMM_CONFIG``
points the layers at a fresh one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

ARGS = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ARGS.add_argument("--quick", action="store_true", help="a smaller set of tile candidates")
ARGS.add_argument("--smoke", action="store_true", help="interpreter run on CPU, no timing")
ARGS.add_argument("--rows", default="1,2,4,8,16", help="row buckets to time")
ARGS.add_argument("--out", default=None, help="table path (default $OUT/<device>.json)")
ARGS.add_argument("--shapes", default="", help="only shapes whose name starts with one of these")
ARGS.add_argument("--merge", default=None, help="start from this table; swept keys replace its")
OPTS = ARGS.parse_args()
if OPTS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import torch  # noqa: E402

from outrider.cluster.bench_timing import capture, median_ms  # noqa: E402
from outrider.kernels.fused import skinny_gemm as sg  # noqa: E402
from outrider.kernels.fused import skinny_table as st  # noqa: E402
from outrider.kernels.fused.activation import silu_and_mul  # noqa: E402
from outrider.kernels.fused.norm import fused_add_rms_norm, rms_norm  # noqa: E402

# (name, N, K, prologues)
SHAPES: list[tuple[str, int, int, tuple[st.Prologue, ...]]] = [
    ("8b.qkv", 6144, 4096, ("none", "norm", "add_norm")),
    ("8b.o", 4096, 4096, ("none",)),
    ("8b.gate_up", 28672, 4096, ("none", "add_norm")),
    ("8b.down", 4096, 14336, ("none", "silu_mul")),
    ("8b.lm_head", 128256, 4096, ("none",)),
    ("8b-eagle3.fc", 4096, 12288, ("none",)),
    ("8b-eagle3.qkv", 6144, 8192, ("none",)),
    ("8b-eagle3.lm_head", 32000, 4096, ("none",)),
    ("qwen3.qkv", 5120, 2048, ("none", "norm", "add_norm")),
    ("qwen3.o", 2048, 4096, ("none",)),
    ("qwen3.router", 128, 2048, ("none",)),
    ("qwen3.lm_head", 151936, 2048, ("none",)),
    ("qwen3-eagle3.fc", 2048, 6144, ("none",)),
    ("qwen3-eagle3.qkv", 5120, 4096, ("none",)),
    ("qwen3-eagle3.gate_up", 12288, 2048, ("none", "add_norm")),
    ("qwen3-eagle3.down", 2048, 6144, ("none", "silu_mul")),
    ("qwen3-eagle3.lm_head", 32000, 2048, ("none",)),
]
SMOKE_SHAPES: list[tuple[str, int, int, tuple[st.Prologue, ...]]] = [
    ("tiny.qkv", 48, 64, ("none", "add_norm")),
    ("tiny.down", 32, 96, ("silu_mul",)),
]
L2_BYTES = 256 << 20  # rotate over weight copies until this many bytes are touched per pass


def candidates(rows: int, quick: bool) -> list[st.SkinnyConfig]:
    if OPTS.smoke:
        return [st.SkinnyConfig(16, 32)]
    if rows == 1:
        grid = itertools.product((8, 16, 32), (256, 512), (4, 8), (3, 4))
        if quick:
            grid = itertools.product((8, 16, 32), (256, 512), (4,), (4,))
    else:
        grid = itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4))
        if quick:
            grid = itertools.product((16, 32, 64), (128, 256), (4,), (3,))
    out = []
    for bn, bk, warps, stages in grid:
        if rows == 1 and bn * bk > 16384:
            continue  # the float32 accumulator tile would spill
        out.append(st.SkinnyConfig(bn, bk, warps, stages))
    return out


def rand(*shape: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def time_graph(fns: list[Callable[[], Any]], device: str) -> float:
    """Microseconds per call, one graph replaying every call once (eager on CPU)."""

    def run_all() -> None:
        for f in fns:
            f()

    if device != "cuda":
        return median_ms(run_all, device) * 1e3 / len(fns)
    return median_ms(capture(run_all), device, reps=9, sample_ms=3.0) * 1e3 / len(fns)


def sweep_one(
    n: int,
    k: int,
    prologue: st.Prologue,
    rows: int,
    dtype: torch.dtype,
    device: str,
    bandwidth: float | None,
) -> dict[str, Any]:
    """The best tiles for one case and its times; the floor is the weight bytes over the copy
    bandwidth (None on the interpreter)."""
    weight_bytes = n * k * dtype.itemsize
    copies = max(1, min(8, -(-L2_BYTES // weight_bytes)))
    ws = [rand(n, k, dtype=dtype, device=device, scale=k**-0.5) for _ in range(copies)]
    cols = 2 * k if prologue == "silu_mul" else k
    x = rand(rows, cols, dtype=dtype, device=device)
    res = rand(rows, k, dtype=dtype, device=device)
    g = 1.0 + 0.2 * rand(k, dtype=dtype, device=device)
    kw: dict[str, Any] = {}
    if prologue in ("norm", "add_norm"):
        kw["norm_weight"] = g
    if prologue == "add_norm":
        kw["residual"] = res

    def baseline(w: torch.Tensor) -> Callable[[], Any]:
        if prologue == "norm":
            return lambda: torch.nn.functional.linear(rms_norm(x, g, 1e-6), w)
        if prologue == "add_norm":
            return lambda: torch.nn.functional.linear(fused_add_rms_norm(x, res, g, 1e-6)[0], w)
        if prologue == "silu_mul":
            return lambda: torch.nn.functional.linear(silu_and_mul(x), w)
        return lambda: torch.nn.functional.linear(x, w)

    base_us = time_graph([baseline(w) for w in ws], device)
    best: tuple[float, st.SkinnyConfig] | None = None
    for cfg in candidates(rows, OPTS.quick):

        def call(w: torch.Tensor, cfg: st.SkinnyConfig = cfg) -> Callable[[], Any]:
            return lambda: sg.skinny_gemm(x, w, prologue=prologue, eps=1e-6, config=cfg, **kw)

        try:
            us = time_graph([call(w) for w in ws], device)
        except Exception as e:  # noqa: BLE001 (a config the compiler refuses is skipped)
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        if best is None or us < best[0]:
            best = (us, cfg)
    assert best is not None, "no candidate config ran"
    us, cfg = best
    out, _ = sg.skinny_gemm(x, ws[0], prologue=prologue, eps=1e-6, config=cfg, **kw)
    ref, _ = sg.skinny_gemm_ref(x, ws[0], prologue=prologue, eps=1e-6, **kw)
    err = float(((out.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1)).max())
    del ws
    return {
        "config": cfg,
        "us": round(us, 2),
        "baseline_us": round(base_us, 2),
        "speedup": round(base_us / us, 3),
        "max_row_error": err,
        "weight_mb": round(weight_bytes / 1e6, 1),
        "floor_us": None if bandwidth is None else round(weight_bytes / bandwidth * 1e6, 2),
    }


def main() -> None:
    if OPTS.smoke:
        from outrider.kernels.interpreter import patch_numpy_index

        patch_numpy_index()
    elif not torch.cuda.is_available():
        sys.exit("gpu_skinny.py needs a CUDA device (or --smoke for an interpreter run)")
    device = "cpu" if OPTS.smoke else "cuda"
    dtype = torch.float16 if OPTS.smoke else torch.bfloat16
    name = "interpreter" if OPTS.smoke else torch.cuda.get_device_name()
    bandwidth = None
    if not OPTS.smoke:
        from outrider.cluster.bench_timing import copy_bandwidth

        bandwidth = copy_bandwidth()
        print(f"{name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows_list = [int(r) for r in OPTS.rows.split(",")]
    entries: dict[str, Any] = {}
    command = "python benchmarks/gpu_skinny.py" + (" --quick" if OPTS.quick else "")
    if OPTS.merge:
        with open(OPTS.merge) as f:
            base = json.load(f)
        entries.update(base["entries"])
        command = f"{base.get('command', '?')}; then {command} --rows {OPTS.rows}"
        if OPTS.shapes:
            command += f" --shapes {OPTS.shapes}"
    prefixes = tuple(p for p in OPTS.shapes.split(",") if p)
    print(
        f"{'shape':22} {'prologue':9} {'M':>3} {'cuBLAS+op µs':>13} {'skinny µs':>10} "
        f"{'×':>6} {'floor µs':>9}  config"
    )
    for label, n, k, prologues in SMOKE_SHAPES if OPTS.smoke else SHAPES:
        if prefixes and not label.startswith(prefixes):
            continue
        for prologue in prologues:
            for rows in rows_list:
                key = st.table_key(prologue, rows, n, k)
                if "chain" in entries.get(key, {}):
                    print(f"{label:22} {prologue:9} {rows:>3} kept: chosen in a model step")
                    continue
                r = sweep_one(n, k, prologue, rows, dtype, device, bandwidth)
                cfg = r.pop("config")
                use = r["us"] < 0.98 * r["baseline_us"]
                entries[key] = st.config_entry(cfg, use=use, shape=label, **r)
                c = f"{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
                print(
                    f"{label:22} {prologue:9} {rows:>3} {r['baseline_us']:>13.1f} "
                    f"{r['us']:>10.1f} {r['speedup']:>6.2f} {r['floor_us'] or 0:>9.1f}  {c}"
                    f"{'  (use)' if use else ''}  err {r['max_row_error']:.1e}",
                    flush=True,
                )
    table = {
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "copy_bandwidth_gbs": None if bandwidth is None else round(bandwidth / 1e9, 1),
        "command": command,
        "entries": entries,
    }
    path = OPTS.out or os.path.join(os.environ.get("OUT", "."), f"{st.device_slug(name)}.json")
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {path} ({sum(e['use'] for e in entries.values())} of {len(entries)} in use)")


if __name__ == "__main__":
    sys.exit(main())
