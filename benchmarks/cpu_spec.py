"""Speculation on vs off on the embedded SmolLM2, in process on this CPU (greedy).

Same prompts and token counts for every configuration, run back to back in one process:
plain decoding, n-gram drafting, and the target drafting for itself (draft_model, an upper bound
that checks the plumbing: every draft is accepted, so it measures overhead, not a speedup).

    .venv/bin/python benchmarks/cpu_spec.py [--max-tokens 128] [--k 4]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.workers.config import ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.models.loader import resolve_model_path
from outrider.workers.spec_config import SpeculativeConfig

PROMPTS = [
    "Repeat this list exactly three times: apple, banana, cherry, date, elderberry.",
    "Write a Python function that returns the n-th Fibonacci number, then explain it.",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog sleeps. The fox runs.",
    "List the days of the week, one per line, and then list them again in reverse order.",
]


def run(name: str, spec: dict[str, Any] | None, max_tokens: int, batch: int) -> dict[str, Any]:
    target = WorkerConfig(model=ModelConfig(dtype="float32"))
    cfg = OutriderConfig(
        target=target, speculative=SpeculativeConfig(**spec) if spec is not None else None
    )
    llm = LLM(cfg)
    ids = [llm.encode(p, chat=True) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(ids[:1], SamplingParams(temperature=0.0, max_tokens=4))
    llm.engine.stats.spec.__init__()  # type: ignore[misc]
    t0 = time.perf_counter()
    n = 0
    outs = []
    for i in range(0, len(ids), batch):
        res = llm.generate(ids[i : i + batch], params)
        outs.extend(res)
        n += sum(len(o.token_ids) for o in res)
    dt = time.perf_counter() - t0
    stats = llm.engine.stats.spec
    return {
        "name": name,
        "tok_s": n / dt,
        "al": stats.acceptance_length,
        "per_pos": [round(c / stats.num_drafts, 3) for c in stats.accepted_per_position]
        if stats.num_drafts
        else [],
        "tokens": [o.token_ids for o in outs],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    embedded = str(resolve_model_path(None))
    k = args.k
    configs: list[tuple[str, dict[str, Any] | None]] = [
        ("plain", None),
        (
            "ngram",
            {
                "method": "ngram",
                "num_speculative_tokens": k,
                "prompt_lookup_min": 2,
                "prompt_lookup_max": 4,
            },
        ),
        (
            "draft_model (self)",
            {
                "method": "draft_model",
                "model": embedded,
                "num_speculative_tokens": k,
                "dtype": "float32",
            },
        ),
    ]
    rows = [run(name, spec, args.max_tokens, args.batch) for name, spec in configs]
    base = rows[0]
    print(f"batch={args.batch} max_tokens={args.max_tokens} k={k} prompts={len(PROMPTS)}")
    print(f"{'config':20s}{'tok/s':>9s}{'speedup':>9s}{'AL':>7s}  per-position  same-as-plain")
    for r in rows:
        al = f"{r['al']:.2f}" if r["al"] else "-"
        same = r["tokens"] == base["tokens"]
        print(
            f"{r['name']:20s}{r['tok_s']:9.1f}{r['tok_s'] / base['tok_s']:9.2f}{al:>7s}  "
            f"{r['per_pos']}  {same}"
        )


if __name__ == "__main__":
    main()
