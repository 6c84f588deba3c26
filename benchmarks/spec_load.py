"""Speculation by load, in process: plain vs fixed k vs goodput, at a synthetic acceptance.

With ``verification: synthetic`` the drafts are accepted at a set mean acceptance length, so
the drafter's quality drops out and what is measured is the system: the cost of drafting and
of verifying k + 1 tokens at each batch size, and where the goodput policy switches
speculation off. Outputs are not the model's (synthetic acceptance); figures from this script
are *synthetic* in docs/benchmarks.md.

    python benchmarks/spec_load.py [--model DIR] [--draft-model DIR] [--k 4]
        [--acceptance-length 2.5] [--batches 1,4,16,64] [--max-tokens 128] [--dtype auto]

Defaults: the embedded SmolLM2 as target and as its own drafter (draft_model).
"""

from __future__ import annotations

import argparse
import json
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


def run(args: argparse.Namespace, spec: dict[str, Any] | None, batch: int) -> dict[str, Any]:
    target = WorkerConfig(model=ModelConfig(path=args.model, dtype=args.dtype))
    speculative = SpeculativeConfig(**spec) if spec is not None else None
    llm = LLM(OutriderConfig(target=target, speculative=speculative))
    ids = [llm.encode(p, chat=True) for p in PROMPTS]
    prompts = [ids[i % len(ids)] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    llm.engine.stats.__init__()  # type: ignore[misc]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    st = llm.engine.stats
    rounds = max(st.num_rounds, 1)
    return {
        "tok_s": sum(len(o.token_ids) for o in outs) / dt,
        "acceptance_length": st.spec.acceptance_length,
        "rounds_by_k": dict(sorted(st.rounds_by_k.items())),
        "ms_per_round": {
            "wall": 1e3 * st.wall_s / rounds,
            "draft": 1e3 * st.draft_s / rounds,
            "verify": 1e3 * st.verify_s / rounds,
            "overhead": 1e3 * st.overhead_s / rounds,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="target (default: embedded SmolLM2)")
    ap.add_argument("--draft-model", default=None, help="drafter (default: the target)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--acceptance-length", type=float, default=2.5)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="one JSON line per run")
    args = ap.parse_args()
    draft = args.draft_model or args.model or str(resolve_model_path(None))
    base = {
        "method": "draft_model",
        "model": draft,
        "num_speculative_tokens": args.k,
        "verification": "synthetic",
        "synthetic_acceptance_length": args.acceptance_length,
    }
    configs: list[tuple[str, dict[str, Any] | None]] = [
        ("plain", None),
        (f"fixed k={args.k}", base),
        ("goodput", {**base, "draft_length_policy": "goodput"}),
    ]
    print(
        f"synthetic acceptance length {args.acceptance_length}, k {args.k}, "
        f"max_tokens {args.max_tokens}, target {args.model or 'embedded'}, drafter {draft}"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        plain = None
        for name, spec in configs:
            r = run(args, spec, batch)
            plain = plain or r["tok_s"]
            if args.json:
                print(json.dumps({"batch": batch, "config": name, **r}))
                continue
            ms = r["ms_per_round"]
            al = r["acceptance_length"]
            print(
                f"batch {batch:4d}  {name:12s} {r['tok_s']:9.1f} tok/s  x{r['tok_s'] / plain:5.2f}"
                f"  AL {al if al is None else round(al, 2)!s:>5}  "
                f"ms/round wall {ms['wall']:.2f} draft {ms['draft']:.2f} "
                f"verify {ms['verify']:.2f} overhead {ms['overhead']:.2f}  k {r['rounds_by_k']}"
            )


if __name__ == "__main__":
    main()
