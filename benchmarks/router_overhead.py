"""The router's per-round overhead without Serve and HTTP: the Router's groups and gRPC only.

    python benchmarks/router_overhead.py [--requests 4] [--max-tokens 48] [--device cpu]

Starts a local Ray cluster on 127.0.0.1, builds the Router of the embedded model with its
default drafter (target and drafter actor groups, gRPC on loopback), drives requests through
``AsyncEngine.generate`` in this process one at a time, and prints per-round means: the round's
wall time, the groups' forward time (``forward_s`` of each reply), and the overhead, split into
the gRPC call time the forwards do not explain (the worker's own work around its forward, as the
worker reports it, and the rest: transport and the client's encoding) and the router's own work
between calls. Compare with the same
figure through Serve (``outrider_spec_decode_round_overhead_seconds``) to see what the HTTP
side adds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any


async def run(args: argparse.Namespace) -> dict[str, float]:
    from outrider.cluster.config import load_config
    from outrider.cluster.default_drafter import default_speculative
    from outrider.cluster.router import Router
    from outrider.workers.config import SamplingParams

    spec = default_speculative(device=args.device) or {}
    cfg = load_config(
        None,
        {
            "target": {"model": {"dtype": "float32"}, "device": args.device},
            "speculative": {**spec, "device": args.device},
        },
    )
    router = Router(cfg)
    await router.start()
    assert router.engine is not None and router.tokenizer is not None
    engine = router.engine
    call_s: dict[str, float] = {"propose": 0.0, "verify": 0.0, "release": 0.0, "overlap": 0.0}
    inner = engine.call

    async def timed(call: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await inner(call)
        finally:
            call_s[call[0]] += time.perf_counter() - t0

    engine.call = timed  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [f"Tell me about topic number {i}." for i in range(args.requests + 1)]
    ids = [
        router.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        for p in prompts
    ]
    ids = [[int(t) for t in (x["input_ids"] if hasattr(x, "keys") else x)] for x in ids]
    async for _ in engine.generate(ids[0], params):  # warm-up
        pass
    stats = engine.core.stats
    r0, w0, d0, v0, o0 = (
        stats.num_rounds,
        stats.wall_s,
        stats.draft_s,
        stats.verify_s,
        stats.overhead_s,
    )
    c0 = dict(call_s)
    clients = [c for c in (router.target, router.drafter) if c is not None]
    wire0 = [(c.call_s, c.worker_s) for c in clients]
    for p in ids[1:]:
        async for _ in engine.generate(p, params):
            pass
    n = stats.num_rounds - r0
    client_call = sum(c.call_s - a for c, (a, _) in zip(clients, wire0, strict=True))
    own = [c.worker_s - b for c, (_, b) in zip(clients, wire0, strict=True)] + [0.0]
    worker = sum(own)
    calls = sum(call_s.values()) - sum(c0.values())
    forward = (stats.draft_s - d0) + (stats.verify_s - v0)
    wall = stats.wall_s - w0
    out = {
        "rounds": float(n),
        "round_ms": wall / n * 1e3,
        "forward_ms": forward / n * 1e3,
        "overhead_ms": (stats.overhead_s - o0) / n * 1e3,
        "in_calls_not_forward_ms": (calls - forward) / n * 1e3,
        "between_calls_ms": (wall - calls) / n * 1e3,
        # NOTE: the two parts of in_calls_not_forward: the workers' own time around their
        # forwards (decode, wire tensors, encode), and the rest (the transport, frame socket or
        # gRPC, and the client's encode and decode).
        "worker_not_forward_ms": (worker - forward) / n * 1e3,
        "transport_ms": (client_call - worker) / n * 1e3,
        "target_worker_not_forward_ms": (own[0] - (stats.verify_s - v0)) / n * 1e3,
        "drafter_worker_not_forward_ms": (own[1] - (stats.draft_s - d0)) / n * 1e3,
        "propose_call_ms": (call_s["propose"] - c0["propose"]) / n * 1e3,
        "draft_forward_ms": (stats.draft_s - d0) / n * 1e3,
        "verify_call_ms": (call_s["verify"] - c0["verify"]) / n * 1e3,
        "verify_forward_ms": (stats.verify_s - v0) / n * 1e3,
    }
    # NOTE: the bare round trip of an empty call on each group's stream (no forward): what a
    # call costs before any worker work, next to the overhead the rounds above show.
    for name, client in (("target", router.target), ("drafter", router.drafter)):
        if client is None:
            continue
        trips = []
        for _ in range(args.pings):
            t0 = time.perf_counter()
            await client.release([])
            trips.append(time.perf_counter() - t0)
        trips.sort()
        out[f"{name}_empty_call_p50_ms"] = trips[len(trips) // 2] * 1e3
    await router.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pings", type=int, default=200, help="empty calls timed per group")
    args = ap.parse_args()
    import ray

    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=4,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        res = asyncio.run(run(args))
    finally:
        ray.shutdown()
    print(" ".join(f"{k}={v:.3f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
