"""MoE layer timings (routing + fused experts) next to their weight-streaming floor (CUDA).

    python benchmarks/gpu_moe.py            # Qwen3-30B-A3B at T = 1, 8, 64; bf16 and fp8;
                                            # triton vs torch (about two minutes on an H200)
    python benchmarks/gpu_moe.py --sweep    # also time alternative Triton tile configs
    python benchmarks/gpu_moe.py --smoke    # no GPU: tiny shapes through the Triton
                                            # interpreter, to check the script itself

``bench_moe(T, H, E, top_k, I, dtype, quant)`` times what the FusedMoE layer runs per forward:
the backend's ``select_experts`` on random router logits, then its ``fused_moe``. It rotates
over ``sets`` input sets, each with its own routing and one of ``layers`` distinct copies of the
expert weights (as consecutive layers of a model would), so replays do not find the weights in
L2. Triton calls are captured in one CUDA graph holding one call per set; the time is the
median over replays (``triton.testing.do_bench``, which also flushes L2 before each replay)
divided by the sets. The torch backends sync with the host (per-expert segments) and are timed
eagerly. The floor is the active experts' weight bytes (unique experts hit × 3·H·I × bytes per
weight, plus the fp8 scales) over the bandwidth of a 1 GiB device-to-device copy (bytes read +
written) measured in the same process. Every timed shape is first checked against the float64
per-expert reference. Writes $OUT/gpu_moe.json when OUT is set.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

QWEN3_30B_A3B = dict(H=2048, E=128, top_k=8, I=768)
# NOTE: set by `--smoke` (before triton is first imported: every import here is lazy).
_SMOKE = os.environ.get("TRITON_INTERPRET") == "1"


def _device() -> torch.device:
    return torch.device("cpu" if _SMOKE else "cuda")


def _bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of fn (do_bench: L2 flushed before each run; events)."""
    import triton

    if _SMOKE:
        fn()
        return float("nan")
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


@functools.cache
def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read plus written."""
    if _SMOKE:
        return float("nan")
    n = 1 << 30
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=_device())
    dst = torch.empty_like(src)
    ms = _bench_ms(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def _expert_weights(
    num_layers: int,
    hidden: int,
    num_experts: int,
    inter: int,
    dtype: torch.dtype,
    quant: str,
    gen: torch.Generator,
) -> list[dict[str, torch.Tensor]]:
    """``num_layers`` distinct random expert sets (fp8-quantized per channel for quant fp8)."""
    from outrider.kernels.moe.fp8 import quantize_fp8_per_channel

    dev = _device()
    layers = []
    for _ in range(num_layers):
        shape13, shape2 = (num_experts, 2 * inter, hidden), (num_experts, hidden, inter)
        w13 = torch.randn(shape13, generator=gen, device=dev, dtype=dtype) / hidden**0.5
        w2 = torch.randn(shape2, generator=gen, device=dev, dtype=dtype) / inter**0.5
        if quant == "fp8":
            q13, s13 = quantize_fp8_per_channel(w13)
            q2, s2 = quantize_fp8_per_channel(w2)
            layers.append(dict(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2))
        else:
            layers.append(dict(w13=w13, w2=w2))
        del w13, w2
    return layers


def _rel_err(
    out: torch.Tensor,  # [T, H]
    x: torch.Tensor,  # [T, H]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    w: dict[str, torch.Tensor],
) -> float:
    """Worst per-token ‖out − ref‖/‖ref‖ against moe_reference in float64 (same routing)."""
    from outrider.kernels.moe import torch_ref

    fp8 = "w13_scale" in w
    ref = torch_ref.moe_reference(
        x.double(),
        w["w13"] if fp8 else w["w13"].double(),
        w["w2"] if fp8 else w["w2"].double(),
        topk_weights.double(),
        topk_ids,
        w.get("w13_scale"),
        w.get("w2_scale"),
    )
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    diff = (out.double() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)
    return float(diff.max())


def bench_moe(
    T: int,
    H: int,
    E: int,
    top_k: int,
    I: int,  # noqa: E741 -- the MoE intermediate size, as in the issue
    dtype: torch.dtype,
    quant: str,
    *,
    backend: str = "triton",
    config: Any = None,  # triton_moe.MoeTileConfig; None = the table's choice
    sets: int = 16,
    layers: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one MoE layer forward (routing + experts) for T tokens; see the module docstring.

    Returns ``us`` (median per call), ``floor_us``, ``ratio`` (us / floor_us),
    ``active_bytes`` (mean per call), ``unique_experts`` (mean per call), ``bandwidth_gbs``,
    ``graph`` (whether the time is a CUDA-graph replay), ``rel_err`` and the inputs.
    """
    from outrider.kernels import registry

    dev = _device()
    if quant not in ("none", "fp8"):
        raise ValueError(f"`quant` must be none or fp8, got {quant!r}")
    kernel = registry.get("moe", backend)
    gen = torch.Generator(device=dev).manual_seed(seed)
    sets = 2 if _SMOKE else sets
    layers = min(layers, sets)
    weights = _expert_weights(layers, H, E, I, dtype, quant, gen)
    xs = [torch.randn(T, H, generator=gen, device=dev, dtype=dtype) for _ in range(sets)]
    logits = [torch.randn(T, E, generator=gen, device=dev, dtype=dtype) for _ in range(sets)]
    kwargs = {} if config is None else {"config": config}

    def call(i: int) -> torch.Tensor:
        w = weights[i % layers]
        tw, ids = kernel.select_experts(logits[i], top_k, True)
        scales = (w["w13_scale"], w["w2_scale"]) if quant == "fp8" else ()
        return kernel.fused_moe(xs[i], w["w13"], w["w2"], tw, ids, *scales, **kwargs)

    routes = [kernel.select_experts(lg, top_k, True) for lg in logits]
    rel_err = _rel_err(call(0), xs[0], *routes[0], weights[0])
    per_weight = 1 if quant == "fp8" else dtype.itemsize
    per_expert = 3 * H * I * per_weight + ((2 * I + H) * 4 if quant == "fp8" else 0)
    unique = [int(ids.unique().numel()) for _, ids in routes]
    active_bytes = sum(unique) * per_expert / sets
    graph = backend == "triton"
    if graph and not _SMOKE:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(sets):
                call(i)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(sets):
                call(i)
        ms = _bench_ms(g.replay) / sets
        del g
    else:
        ms = _bench_ms(lambda: [call(i) for i in range(sets)]) / sets
    table_config = None
    if backend == "triton":
        from outrider.kernels.moe.triton_moe import tile_config

        table_config = "table " + _cfg_label(tile_config(T, top_k, E, H, I, dtype, quant == "fp8"))
    bw = copy_bandwidth()
    floor_us = active_bytes / bw * 1e6
    us = ms * 1e3
    return dict(
        backend=backend, T=T, H=H, E=E, top_k=top_k, I=I,
        dtype=str(dtype).removeprefix("torch."), quant=quant,
        us=us, floor_us=floor_us, ratio=us / floor_us if floor_us > 0 else float("nan"),
        active_bytes=active_bytes, unique_experts=sum(unique) / sets,
        bandwidth_gbs=bw / 1e9, graph=graph, sets=sets, layers=layers, rel_err=rel_err,
        config=_cfg_label(config) if config is not None else table_config,
    )  # fmt: skip


def _cfg_label(c: Any) -> str:
    """MoeTileConfig as ``m16 up16x256 down16x512 w4 s3/4 pair``."""
    return (
        f"m{c.block_m} up{c.block_n1}x{c.block_k1} down{c.block_n2}x{c.block_k2} "
        f"w{c.num_warps} s{c.stages1}/{c.stages2} {'pair' if c.pair_major else 'grouped'}"
    )


def _sweep_configs(num_tokens: int, top_k: int) -> list[Any]:
    """Alternatives to the table's tiles around the decode sizes."""
    from outrider.kernels.moe.triton_moe import MoeTileConfig as C

    pair = [
        C(16, 16, 256, 16, 256, 4, 3, 8, True),
        C(16, 16, 256, 16, 256, 4, 3, 4, True),
        C(16, 16, 128, 16, 128, 4, 4, 8, True),
        C(16, 32, 128, 32, 256, 4, 4, 6, True),
        C(16, 16, 512, 16, 256, 4, 2, 6, True),
        C(16, 16, 256, 32, 256, 4, 3, 6, True),
        C(16, 16, 256, 16, 256, 2, 4, 8, True),
        C(16, 16, 256, 16, 256, 8, 3, 8, True),
    ]
    grouped = [
        C(16, 16, 256, 32, 256, 4, 3, 3, False),
        C(16, 32, 128, 64, 128, 4, 4, 4, False),
        C(16, 32, 256, 32, 256, 4, 3, 3, False),
        C(16, 64, 128, 64, 128, 4, 3, 3, False),
        C(16, 64, 128, 128, 64, 4, 4, 4, False),
        C(16, 32, 128, 64, 128, 8, 5, 5, False),
        C(32, 64, 128, 64, 128, 4, 3, 3, False),
    ]
    return (pair if num_tokens * top_k <= 64 else []) + grouped


def _fmt(r: dict[str, Any]) -> str:
    def f(x: float) -> str:
        return "      -" if x != x else f"{x:7.1f}"

    what = f"{r['backend']:10s} {r['dtype']}/{r['quant']:4s} T={r['T']:<3d}"
    return (
        f"{what:34s} experts {r['unique_experts']:5.1f}  MB {r['active_bytes'] / 1e6:7.1f}  "
        f"us {f(r['us'])}  floor {f(r['floor_us'])}  x{r['ratio']:5.2f}  "
        f"{'graph' if r['graph'] else 'eager'}  err {r['rel_err']:.1e}"
        + (f"  {r['config']}" if r.get("config") else "")
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="time alternative Triton tile configs")
    ap.add_argument("--smoke", action="store_true", help="interpreter run on CPU, no timing")
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 64])
    opts = ap.parse_args(argv)
    global _SMOKE
    if opts.smoke:
        if "triton" in sys.modules and not _SMOKE:
            sys.exit("--smoke must switch Triton to its interpreter before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        _SMOKE = True
    if not _SMOKE and not torch.cuda.is_available():
        sys.exit("gpu_moe.py needs a CUDA device (or --smoke for an interpreter run)")
    if _SMOKE:
        from outrider.kernels.interpreter import patch_numpy_index

        patch_numpy_index()
        shape, dtype = dict(H=64, E=8, top_k=2, I=32), torch.float16
        tokens = [1, 5]
    else:
        shape, dtype = QWEN3_30B_A3B, torch.bfloat16
        tokens = opts.tokens
        print(f"{torch.cuda.get_device_name()}  copy bandwidth {copy_bandwidth() / 1e12:.2f} TB/s")
    rows = []
    dims = (shape["H"], shape["E"], shape["top_k"], shape["I"], dtype)
    for quant in ("none", "fp8"):
        for t in tokens:
            for backend in ("triton", "torch" if quant == "none" else "torch_loop"):
                rows.append(bench_moe(t, *dims, quant, backend=backend))
                print(_fmt(rows[-1]), flush=True)
            if opts.sweep:
                for cfg in _sweep_configs(t, shape["top_k"]):
                    try:
                        rows.append(bench_moe(t, *dims, quant, config=cfg))
                    except Exception as exc:  # out of shared memory or registers: note, go on
                        print(f"    {_cfg_label(cfg)}: {type(exc).__name__}", flush=True)
                        continue
                    print("    " + _fmt(rows[-1]), flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gpu_moe.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
