"""F.linear vs the oneDNN packed path on SmolLM2-135M's projection shapes (30 layers, cold).

.venv/bin/python benchmarks/cpu_linear.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from outrider.kernels import linear as cpu_linear

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down


def time_all(m: int, weights: list[list[torch.Tensor]], fn: Callable[..., torch.Tensor]) -> float:
    x = {k: torch.randn(m, k) for k in (576, 1536)}
    for _ in range(2):
        for ws in weights:
            for w in ws:
                fn(x[w.shape[1]], w)
    t0 = time.perf_counter()
    n = 5
    for _ in range(n):
        for ws in weights:
            for w in ws:
                fn(x[w.shape[1]], w)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    torch.manual_seed(0)
    weights = [[torch.randn(n, k) for n, k in SHAPES] for _ in range(LAYERS)]
    packed = {id(w): cpu_linear.pack_weight(w) for ws in weights for w in ws}
    print(f"threads={torch.get_num_threads()}  ms for {LAYERS} layers x {len(SHAPES)} projections")
    for m in (1, 8, 16):
        ref = time_all(m, weights, lambda x, w: F.linear(x, w))
        fast = time_all(
            m, weights, lambda x, w: cpu_linear.packed_linear(x, packed[id(w)], None, w.shape[0])
        )
        print(f"rows={m:3d}  F.linear {ref:6.1f}  packed {fast:6.1f}  ({ref / fast:.2f}x)")


if __name__ == "__main__":
    main()
