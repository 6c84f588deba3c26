"""Held-out acceptance and speed of trained drafters on this CPU, plain decoding measured once.

    python benchmarks/cpu_drafters.py DRAFTER_DIR [DRAFTER_DIR ...] [--num-prompts 16]
        [--max-tokens 128] [--json OUT]

Prompts: Magpie prompts written by the target over the held-out topic list (seed 1000; the
training data used seed 0 and another topic list). Greedy, k from each checkpoint, batch 1.
Every speculative output is checked token for token against plain decoding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from outrider.cluster.llm import LLM
from outrider.train.cli import heldout_prompt_ids
from outrider.train.evaluate import eval_config, timed_greedy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("drafters", nargs="+")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plain = LLM(eval_config(None, "cpu", None, 4, 1))
    prompts = heldout_prompt_ids(plain, args.num_prompts, 0)
    ref, tps_plain, _ = timed_greedy(plain, prompts, args.max_tokens, 1)
    rows = [{"drafter": "plain", "tokens_per_s": tps_plain}]
    print(f"plain: {tps_plain:.1f} tok/s over {len(prompts)} prompts", flush=True)
    for d in args.drafters:
        llm = LLM(eval_config(None, "cpu", d, 4, 1))
        got, tps, st = timed_greedy(llm, prompts, args.max_tokens, 1)
        drafts = max(st.num_drafts, 1)
        row = {
            "drafter": d,
            "tokens_per_s": tps,
            "speedup": tps / tps_plain,
            "acceptance_length": st.acceptance_length,
            "per_position": [a / drafts for a in st.accepted_per_position],
            "lossless": got == ref,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
