"""One token's MoE block, router included: the three-launch token path against the general one.

    python benchmarks/gpu_moe_token.py           # Qwen3-30B-A3B block at one token, bf16
    python benchmarks/gpu_moe_token.py --sweep   # also coordinate-descend over the tiles
    OUTRIDER_PDL=0 python benchmarks/gpu_moe_token.py --breakdown  # each launch's device time

Times ``triton_moe_token.token_moe`` (router, gate/up with top-k, down) and the general path the
layer ran before it (router linear, ``select_experts``, ``fused_moe``), each as one CUDA graph of
``--layers`` calls over distinct weight copies (as consecutive layers, so nothing is served from
L2), median of CUDA-event replays divided by the layers. The floor is the routed experts' weight
bytes plus the router's over a 1 GiB device-to-device copy's bandwidth (bytes read + written).
Each config is first checked against the general path (same experts, close outputs). Writes
``$OUT/gpu_moe_token.json`` when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch

H, E, TOP_K, INTER = 2048, 128, 8, 768


def _replay_ms(fn: Callable[[], Any], reps: int = 40) -> float:
    from outrider.cluster.bench_timing import capture

    fn()
    torch.cuda.synchronize()
    replay = capture(fn)
    for _ in range(3):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="print each launch's device time per block (profiled graph replays; with PDL on, "
        "a kernel's time includes its wait for the one before)",
    )
    args = ap.parse_args(argv)
    from outrider.cluster.bench_timing import copy_bandwidth
    from outrider.kernels.moe import triton_moe_token as tok
    from outrider.kernels.moe.triton_moe import fused_moe
    from outrider.kernels.moe.triton_routing import select_experts

    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    layers = [
        dict(
            x=torch.randn(1, H, device=dev, dtype=dt),
            gate=torch.randn(E, H, device=dev, dtype=dt) / H**0.5,
            w13=torch.randn(E, 2 * INTER, H, device=dev, dtype=dt) / H**0.5,
            w2=torch.randn(E, H, INTER, device=dev, dtype=dt) / INTER**0.5,
        )
        for _ in range(args.layers)
    ]
    bw = copy_bandwidth()
    floor_us = ((TOP_K * 3 * H * INTER + E * H) * 2) / bw * 1e6
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; floor {floor_us:.1f} us per block")

    def general(p: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = p["x"] @ p["gate"].T  # [1, E]
        w, ids = select_experts(logits, TOP_K, True)
        return fused_moe(p["x"], p["w13"], p["w2"], w, ids)

    def token(p: dict[str, torch.Tensor], cfg: Any) -> torch.Tensor:
        return tok.token_moe(p["x"], p["gate"], p["w13"], p["w2"], TOP_K, True, config=cfg)[0]

    want = [general(p) for p in layers]
    rows: list[dict[str, Any]] = []

    def time_config(cfg: Any) -> float:
        for p, ref in zip(layers, want, strict=True):
            got = token(p, cfg)
            err = float((got.float() - ref.float()).norm() / ref.float().norm())
            if err > 2e-2:
                raise AssertionError(f"{cfg}: relative error {err:.2e} against the general path")
        us = _replay_ms(lambda: [token(p, cfg) for p in layers]) * 1e3 / args.layers
        rows.append(dict(path="token", config=dataclasses.asdict(cfg), us=us, x=us / floor_us))
        print(f"token   {us:7.1f} us  x{us / floor_us:.2f}  {cfg}")
        return us

    g_us = _replay_ms(lambda: [general(p) for p in layers]) * 1e3 / args.layers
    rows.append(dict(path="general", us=g_us, x=g_us / floor_us))
    print(f"general {g_us:7.1f} us  x{g_us / floor_us:.2f}  (router, select_experts, fused_moe)")
    best = tok.DEFAULT_CONFIG
    best_us = time_config(best)
    if args.breakdown:
        from outrider.cluster.bench_timing import capture, format_kernel_times, kernel_times

        replay = capture(lambda: [token(p, best) for p in layers])
        times = kernel_times(replay, dev)
        per_block = [(name, us / args.layers, n / args.layers) for name, us, n in times]
        print("per block:\n" + "\n".join(format_kernel_times(per_block)))
        rows.append(dict(path="breakdown", kernels=per_block))
    if args.sweep:
        grids: list[dict[str, list[Any]]] = [
            dict(block_n2=[2, 4, 8], block_k2=[64, 128, 256]),
            dict(block_n1=[8, 16], block_k1=[128, 256, 512], stages1=[3, 5]),
            dict(router_block_e=[4, 8, 16], router_block_k=[128, 256, 512]),
            dict(num_warps=[2, 4, 8]),
        ]
        for grid in grids:
            names = list(grid)
            for values in _product([grid[n] for n in names]):
                cfg = dataclasses.replace(best, **dict(zip(names, values, strict=True)))
                if cfg == best:
                    continue
                try:
                    us = time_config(cfg)
                except Exception as exc:  # a tile the compiler refuses
                    print(f"skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                if us < best_us:
                    best, best_us = cfg, us
        print(f"best    {best_us:7.1f} us  x{best_us / floor_us:.2f}  {best}")
        rows.append(dict(path="best", config=dataclasses.asdict(best), us=best_us))
        if best != tok.DEFAULT_CONFIG:  # the two alternately, three times each
            ab = {"default": tok.DEFAULT_CONFIG, "best": best}
            times: dict[str, list[float]] = {name: [] for name in ab}
            for _ in range(3):
                for name, cfg in ab.items():
                    times[name].append(time_config(cfg))
            for name, us_list in times.items():
                print(f"a/b {name:8s} " + " ".join(f"{us:6.1f}" for us in us_list) + " us")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_moe_token.json"), "w") as f:
            json.dump(dict(floor_us=floor_us, bandwidth=bw, rows=rows), f, indent=1)
    return rows


def _product(lists: list[list[Any]]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [()]
    for values in lists:
        out = [t + (v,) for t in out for v in values]
    return out


if __name__ == "__main__":
    main()
