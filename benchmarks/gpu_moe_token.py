"""One token's MoE block, router included: the three-launch token path against the general one.

    python benchmarks/gpu_moe_token.py           # Qwen3-30B-A3B block at one token, bf16
    python benchmarks/gpu_moe_token.py --sweep   # also coordinate-descend over the tiles

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
    if args.sweep:
        grids: list[dict[str, list[int]]] = [
            dict(block_n1=[4, 8, 16], block_k1=[256, 512, 1024], stages1=[3, 4, 5]),
            dict(block_n2=[4, 8, 16], block_k2=[128, 256, 512], stages2=[3, 4, 5]),
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
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_moe_token.json"), "w") as f:
            json.dump(dict(floor_us=floor_us, bandwidth=bw, rows=rows), f, indent=1)
    return rows


def _product(lists: list[list[int]]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for values in lists:
        out = [t + (v,) for t in out for v in values]
    return out


if __name__ == "__main__":
    main()
