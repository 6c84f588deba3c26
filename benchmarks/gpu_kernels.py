"""Triton attention and rejection-sampler timings next to their memory floor (CUDA only).

    python benchmarks/gpu_kernels.py            # the table (about a minute on an H100)
    python benchmarks/gpu_kernels.py --sweep    # also try 18 tile configs and 7 split counts
                                                # per attention shape (several minutes)
    python benchmarks/gpu_kernels.py --smoke    # no GPU: tiny shapes through the Triton
                                                # interpreter, to check the script itself

Attention runs at Llama-3.1-8B shapes (32 query heads, 8 KV heads, head dim 128, bf16, paged
KV with 16-token blocks): decode at batch 1/8/64 with 1k/4k context, verify (5 query tokens,
causal among themselves) at batch 1/8. Its floor is the KV bytes read (every cached key and
value of every sequence, once) over the copy bandwidth measured here with a large
device-to-device copy (bytes read + written over time). The rejection sampler runs at B=8/64,
K=4, V=128256 in float32; its floor is the vocabulary rows it must read (p, q and the noise at
each rejected row's first rejected position). Times are medians of triton.testing.do_bench,
rotating over several input sets so that repeated calls do not run out of L2; "graph" replays
one CUDA graph holding one call per input set, which removes the launch gaps. Every timed shape
is first checked against the torch reference. Writes $OUT/gpu_kernels.json when OUT is set.
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
ARGS.add_argument("--sweep", action="store_true", help="try tile configs and split counts")
ARGS.add_argument("--smoke", action="store_true", help="interpreter run on CPU, no timing")
ARGS.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
OPTS = ARGS.parse_args()
if OPTS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references stay float32
import triton  # noqa: E402

from outrider.kernels.attention import torch_ref as attn_ref  # noqa: E402
from outrider.kernels.attention.metadata import AttentionMetadata  # noqa: E402
from outrider.kernels.attention.triton_attn import paged_attention  # noqa: E402
from outrider.kernels.sampling import torch_ref as samp_ref  # noqa: E402
from outrider.kernels.sampling.triton_rejection import (  # noqa: E402
    rejection_sample,
    rejection_sample_strict,
)

if OPTS.smoke:
    from outrider.kernels.interpreter import patch_numpy_index

    patch_numpy_index()
    DEV = torch.device("cpu")
    DTYPE = torch.float16  # the interpreter has no bfloat16 arithmetic
    N_HEADS, N_KV, HD, BS = 8, 2, 64, 16
    DECODE = [(1, 64), (2, 100)]
    VERIFY = [(2, 70)]
    REJ = [(4, 4, 300)]
else:
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA device (or --smoke for an interpreter run)")
    DEV = torch.device("cuda")
    DTYPE = torch.bfloat16
    N_HEADS, N_KV, HD, BS = 32, 8, 128, 16
    DECODE = [(b, c) for b in (1, 8, 64) for c in (1024, 4096)]
    VERIFY = [(b, c) for b in (1, 8) for c in (1024, 4096)]
    REJ = [(8, 4, 128256), (64, 4, 128256)]
VERIFY_Q = 5
# NOTE: the shapes --sweep tunes (the batch-1 and batch-8 decode/verify steps at 4k context).
SWEEP_SHAPES = {("decode", 1, 4096), ("decode", 8, 4096), ("verify", 1, 4096)}
if OPTS.smoke:
    SWEEP_SHAPES = {("decode", 1, 64)}
ROTATE_BYTES = 256 << 20  # input sets per shape: at least this many bytes in all (L2 is 50 MB)
MAX_SETS = 64


def bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds of fn (do_bench: events, warm-up and repeat in ms)."""
    if OPTS.smoke:
        fn()
        return float("nan")
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def bench_graph(calls: list[Callable[[], Any]]) -> float:
    """Median ms per call of one CUDA graph replaying every call once."""
    if OPTS.smoke or OPTS.no_graph:
        return float("nan")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = bench(graph.replay)
    del graph
    return ms / len(calls)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read plus written."""
    if OPTS.smoke:
        return float("nan")
    n = 1 << 30
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def attention_sets(b: int, ctx: int, q_len: int, gen: torch.Generator) -> dict[str, Any]:
    """Input sets over one pool of KV blocks; each set's blocks are its own, shuffled."""
    blocks_per_seq = -(-ctx // BS)
    kv_bytes = 2 * b * ctx * N_KV * HD * DTYPE.itemsize  # K and V read once
    sets = max(2, min(MAX_SETS, -(-ROTATE_BYTES // kv_bytes)))
    if OPTS.smoke:
        sets = 2
    per_set = b * blocks_per_seq
    n_blocks = sets * per_set
    shape = (n_blocks, BS, N_KV, HD)
    k_cache = torch.randn(shape, dtype=DTYPE, device=DEV)
    v_cache = torch.randn(shape, dtype=DTYPE, device=DEV)
    mds, qs = [], []
    for s in range(sets):
        perm = (s * per_set + torch.randperm(per_set, generator=gen)).view(b, blocks_per_seq)
        q_start = torch.arange(b + 1) * q_len
        md = AttentionMetadata(
            slot_mapping=torch.full((b * q_len,), -1, dtype=torch.int64, device=DEV),
            query_start_loc=q_start.to(DEV),
            seq_lens=torch.full((b,), ctx, dtype=torch.int64, device=DEV),
            block_tables=perm.to(DEV),
            max_query_len=q_len,
            max_seq_len=ctx,
            causal=True,
            query_lens_cpu=[q_len] * b,
            seq_lens_cpu=[ctx] * b,
        )
        mds.append(md)
        qs.append(torch.randn(b * q_len, N_HEADS, HD, generator=gen).to(DEV, DTYPE))
    return dict(k_cache=k_cache, v_cache=v_cache, mds=mds, qs=qs, kv_bytes=kv_bytes)


def attention_check(data: dict[str, Any], scale: float, **cfg: Any) -> float:
    """‖triton − torch‖/‖torch‖ on set 0; the reference in float32 on the gathered keys."""
    md, q = data["mds"][0], data["qs"][0]
    out = paged_attention(q, data["k_cache"], data["v_cache"], md, scale, **cfg)
    used = md.block_tables.flatten()
    # NOTE: a compact float32 copy of set 0's blocks keeps the reference's memory small.
    kc = data["k_cache"][used].float()
    vc = data["v_cache"][used].float()
    ref_md = AttentionMetadata(
        slot_mapping=md.slot_mapping,
        query_start_loc=md.query_start_loc,
        seq_lens=md.seq_lens,
        block_tables=torch.arange(used.numel(), device=DEV).view_as(md.block_tables),
        max_query_len=md.max_query_len,
        max_seq_len=md.max_seq_len,
        causal=md.causal,
    )
    ref = attn_ref.paged_attention(q.float(), kc, vc, ref_md, scale)
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def attention_callers(
    data: dict[str, Any], scale: float
) -> tuple[Callable[..., list[Callable[[], Any]]], Callable[..., float]]:
    """(calls(**cfg): one call per input set, eager(**cfg): median ms rotating over them)."""
    kc, vc = data["k_cache"], data["v_cache"]
    outs = [torch.empty_like(q) for q in data["qs"]]

    def calls(**cfg: Any) -> list[Callable[[], Any]]:
        return [
            (lambda q=q, md=md, o=o: paged_attention(q, kc, vc, md, scale, out=o, **cfg))
            for q, md, o in zip(data["qs"], data["mds"], outs, strict=True)
        ]

    def eager(**cfg: Any) -> float:
        it = itertools.cycle(calls(**cfg))
        return bench(lambda: next(it)())

    return calls, eager


def attention_rows(bw: float, gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    scale = HD**-0.5
    shapes = [("decode", b, c, 1) for b, c in DECODE] + [
        ("verify", b, c, VERIFY_Q) for b, c in VERIFY
    ]
    for kind, b, ctx, q_len in shapes:
        data = attention_sets(b, ctx, q_len, gen)
        err = attention_check(data, scale)
        calls, eager = attention_callers(data, scale)
        ms = eager()
        graph_ms = bench_graph(calls())
        floor_ms = data["kv_bytes"] / bw * 1e3
        row = dict(
            kernel="attention", kind=kind, batch=b, context=ctx, q_len=q_len, sets=len(data["qs"]),
            ms=ms, graph_ms=graph_ms, floor_ms=floor_ms, kv_bytes=data["kv_bytes"],
            rel_err=err,
        )  # fmt: skip
        if OPTS.sweep and (kind, b, ctx) in SWEEP_SHAPES:
            row["sweep"] = sweep_attention(calls, data, scale)
        rows.append(row)
        print(fmt_row(row), flush=True)
    return rows


def sweep_attention(
    calls: Callable[..., list[Callable[[], Any]]], data: dict[str, Any], scale: float
) -> list[dict[str, Any]]:
    """Tile configs x split counts, each timed as CUDA-graph replays (as the decode step runs)."""
    timed = bench_graph if not OPTS.no_graph else (lambda cs: bench(cs[0]))
    results = []
    for block_n, warps, stages, splits in itertools.product(
        (32, 64), (2, 4), (1, 2, 3), (None, 32, 64, 128)
    ):
        cfg = dict(block_n=block_n, num_warps=warps, num_stages=stages, num_splits=splits)
        try:
            err = attention_check(data, scale, **cfg)
            ms = timed(calls(**cfg))
        except Exception as exc:  # out of shared memory or registers: note and go on
            results.append(dict(**cfg, error=type(exc).__name__))
            continue
        results.append(dict(**cfg, ms=ms, rel_err=err))
    ranked = sorted((r for r in results if "ms" in r), key=lambda r: r["ms"])
    for r in ranked[:5]:
        print(f"    sweep: {r}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# rejection sampler
# ---------------------------------------------------------------------------------------------
def rejection_sets(b: int, k: int, v: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    set_bytes = b * (2 * k + 2) * v * 4
    sets = 2 if OPTS.smoke else max(2, min(MAX_SETS, -(-ROTATE_BYTES // set_bytes)))
    out = []
    for _ in range(sets):
        q = (2 * torch.randn(b, k, v, generator=gen)).softmax(-1)
        p = 0.5 * (2 * torch.randn(b, k + 1, v, generator=gen)).softmax(-1)
        p[:, :k] += 0.5 * q
        drafts = torch.multinomial(q.view(-1, v), 1, generator=gen).view(b, k)
        out.append(
            dict(
                drafts=drafts,
                n=torch.full((b,), k, dtype=torch.int64),
                q=q,
                p=p,
                u=torch.rand(b, k, generator=gen),
                noise=torch.empty(b, v).exponential_(generator=gen),
                bonus=torch.randint(0, v, (b,), generator=gen),
                targets=p.argmax(-1),
            )
        )
    return [{key: t.to(DEV) for key, t in s.items()} for s in out]


def rejection_rows(bw: float, gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for b, k, v in REJ:
        sets = rejection_sets(b, k, v, gen)
        s0 = sets[0]
        for variant in ("q", "onehot", "strict"):
            if variant == "strict":
                args = [(s["drafts"], s["n"], s["targets"]) for s in sets]
                fn, ref_fn = rejection_sample_strict, samp_ref.rejection_sample_strict
            else:
                args = [
                    (s["drafts"], s["n"], s["q"] if variant == "q" else None, s["p"], s["u"],
                     s["noise"], s["bonus"])
                    for s in sets
                ]  # fmt: skip
                fn, ref_fn = rejection_sample, samp_ref.rejection_sample
            got, ref = fn(*args[0]), ref_fn(*args[0])
            exact = bool(torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]))
            rejected = int((ref[1] < s0["n"]).sum())
            per_row = 0 if variant == "strict" else (3 if variant == "q" else 2) * v * 4
            floor_bytes = rejected * per_row + b * (2 * k + 2) * 8  # + ids, counts
            it = itertools.cycle(args)
            ms = bench(lambda fn=fn, it=it: fn(*next(it)))
            it_ref = itertools.cycle(args)
            ref_ms = bench(lambda ref_fn=ref_fn, it=it_ref: ref_fn(*next(it)))
            graph_ms = bench_graph([(lambda fn=fn, a=a: fn(*a)) for a in args])
            row = dict(
                kernel="rejection", kind=variant, batch=b, k=k, vocab=v, sets=len(sets),
                ms=ms, graph_ms=graph_ms, torch_ms=ref_ms, floor_ms=floor_bytes / bw * 1e3,
                rejected_rows=rejected, exact=exact,
            )  # fmt: skip
            rows.append(row)
            print(fmt_row(row), flush=True)
    return rows


def fmt_row(r: dict[str, Any]) -> str:
    def f(x: float) -> str:
        return "     -" if x != x else f"{x * 1e3:6.1f}"

    ratio = r["ms"] / r["floor_ms"] if r["floor_ms"] > 0 else float("nan")
    g_ratio = r["graph_ms"] / r["floor_ms"] if r["floor_ms"] > 0 else float("nan")
    if r["kernel"] == "attention":
        what = f"attn {r['kind']:6s} b={r['batch']:<3d} ctx={r['context']:<5d} q={r['q_len']}"
        check = f"err {r['rel_err']:.1e}"
    else:
        what = f"rej  {r['kind']:6s} b={r['batch']:<3d} K={r['k']} V={r['vocab']}"
        check = f"exact={r['exact']} rej={r['rejected_rows']} torch {f(r['torch_ms'])}"
    return (
        f"{what:42s} us {f(r['ms'])}  graph {f(r['graph_ms'])}  floor {f(r['floor_ms'])}"
        f"  x{ratio:5.2f} (graph x{g_ratio:5.2f})  {check}"
    )


def no_nan(x: Any) -> Any:
    """NaN (not timed) as null, so the file is plain JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [no_nan(v) for v in x]
    return x


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    dev_name = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu (interpreter)"
    bw = copy_bandwidth()
    print(f"device {dev_name}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write, 1 GiB device-to-device copy)")
    print("times in microseconds (median); x = time / floor")
    if OPTS.smoke:
        bw = 1e12  # arbitrary: the smoke run times nothing
    rows = attention_rows(bw, gen) + rejection_rows(bw, gen)
    bad = [r for r in rows if r.get("exact") is False or r.get("rel_err", 0.0) > 1e-2]
    if bad:
        print(f"CHECK FAILED for {len(bad)} rows: see rel_err / exact above")
    result = dict(
        device=dev_name, torch=torch.__version__, triton=triton.__version__,
        copy_bandwidth_bytes_per_s=bw, rows=rows,
    )  # fmt: skip
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = os.path.join(out_dir, "gpu_kernels.json")
        with open(path, "w") as fh:
            json.dump(no_nan(result), fh, indent=1)
        print(f"wrote {path}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
