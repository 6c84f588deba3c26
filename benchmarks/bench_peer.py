"""outrider next to vLLM 0.26 at the same shapes, random weights and synthetic acceptance.

Both sides run the peer's model configs (../shared/peers/vllm: ``tgt`` = Llama-3.1-8B shape,
``moe`` = Qwen3-30B-A3B shape, their ``eagle3`` / ``peagle`` / ``moe_eagle3`` drafters) with
random weights, k = 4 and per-position synthetic acceptance 0.72/0.50/0.33/0.22, and time the
same thing peer.py times: prompts of 128 random token ids, greedy, ``ignore_eos``;
``ms = (t(bs, N + 1) - t(bs, 1)) / N`` (N = 256), i.e. ms per token at batch 1 and ms per step
at batch 8. Speculative rows are *synthetic*: accepted drafts are not compared with the
target's tokens.

    python3 benchmarks/bench_peer.py --side both      # outrider, then vLLM, per case
    python3 benchmarks/bench_peer.py --side outrider  # no vLLM needed
    python3 benchmarks/bench_peer.py --smoke          # CPU, tiny shapes, outrider only
    python3 benchmarks/bench_peer.py --merge a.json b.json  # one table from split runs

outrider: the target is built on cuda:0 by ``random_init`` (nothing on disk); the drafter, a
random speculators checkpoint written to a temporary folder, runs on cuda:1 when two GPUs are
visible (else cuda:0; ``--drafter-device``). Each case runs in a fresh process. vLLM: each case
is ``python3 <peer-dir>/peer.py MODE TARGET`` with /tmp/site on PYTHONPATH (docs/benchmarks.md
says how to stage it); peer.py measures batch 1 and 8 only. Writes a markdown table to stdout
and JSON to ``--json`` (default $OUT/bench_peer.json when OUT is set, else bench_peer.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_common import (  # noqa: E402
    MAX_BATCH,
    MAX_MODEL_LEN,
    MODES,
    PEER_BATCHES,
    PEER_TOKENS,
    PROMPT_LEN,
    RATES,
    SHARED_PEER,
    BenchError,
    Case,
    K,
    Result,
    Settings,
)
from peer_outrider import run_outrider  # noqa: E402
from peer_report import caption, load_runs, split_table, stall_lines, table  # noqa: E402
from peer_vllm import check_vllm, run_vllm  # noqa: E402


# -- CLI -------------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", choices=("outrider", "vllm", "both"), default="both")
    ap.add_argument("--targets", default="tgt,moe", help="of tgt, moe")
    ap.add_argument("--modes", default="plain,eagle3,peagle", help="peagle runs on tgt only")
    ap.add_argument("--batch-sizes", default="1,8", help="peer.py measures 1 and 8 only")
    ap.add_argument("--tokens", type=int, default=None, help=f"timed tokens ({PEER_TOKENS})")
    ap.add_argument("--prompt-len", type=int, default=None, help=f"({PROMPT_LEN})")
    ap.add_argument("--peer-dir", default=".devkit-vl", help="staged peer.py and its configs")
    ap.add_argument("--vllm-python", default="python3")
    ap.add_argument("--drafter-device", default=None, help="default cuda:1 if 2 GPUs else cuda:0")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--moe-backend", default="auto")
    ap.add_argument("--draft-length-policy", choices=("fixed", "goodput"), default="fixed")
    ap.add_argument("--cache-gib", type=float, default=None, help="KV cache per group (4)")
    ap.add_argument("--json", default=None, help="JSON path (default $OUT/bench_peer.json)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, outrider only")
    ap.add_argument(
        "--merge", nargs="+", default=None, help="print one table from earlier runs' JSON files"
    )
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[list[Case], Settings]:
    targets, modes = _csv(args.targets), _csv(args.modes)
    for t in targets:
        if t not in MODES:
            raise BenchError(f"`--targets` must be of {', '.join(MODES)}, got {t!r}")
    for m in modes:
        if m not in MODES["tgt"]:
            raise BenchError(f"`--modes` must be of {', '.join(MODES['tgt'])}, got {m!r}")
    cases = [Case(t, m) for t in targets for m in modes if m in MODES[t]]
    if not cases:
        raise BenchError("no case to run: peagle runs on tgt only")
    batch_sizes = tuple(int(b) for b in _csv(args.batch_sizes))
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > MAX_BATCH:
        raise BenchError(f"`--batch-sizes` must be in [1, {MAX_BATCH}], got {args.batch_sizes}")
    peer_dir = Path(args.peer_dir)
    config_dir = peer_dir if (peer_dir / "tgt" / "config.json").is_file() else SHARED_PEER
    tokens = args.tokens or (8 if args.smoke else PEER_TOKENS)
    prompt_len = args.prompt_len or (16 if args.smoke else PROMPT_LEN)
    if tokens < 1 or prompt_len < 1:
        raise BenchError(f"`--tokens` and `--prompt-len` must be >= 1, got {tokens}, {prompt_len}")
    if prompt_len + tokens + 2 * K + 2 > MAX_MODEL_LEN:
        raise BenchError(f"prompt + tokens must fit max_model_len {MAX_MODEL_LEN}")
    settings = Settings(
        config_dir=str(config_dir),
        batch_sizes=batch_sizes,
        num_tokens=tokens,
        prompt_len=prompt_len,
        smoke=args.smoke,
        drafter_device=args.drafter_device,
        attention_backend=args.attention_backend,
        moe_backend=args.moe_backend,
        cache_gib=args.cache_gib or (0.02 if args.smoke else 4.0),
        draft_length_policy=args.draft_length_policy,
    )
    return cases, settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cases, s = resolve(args)
    if args.smoke:
        import torch

        # NOTE: tiny shapes on a shared CPU: more threads only contend.
        torch.set_num_threads(1)
    if args.merge:
        return report_out(args, s, load_runs(args.merge))
    side = "outrider" if args.smoke else args.side
    peer_dir = Path(args.peer_dir)
    if side in ("vllm", "both"):
        check_vllm(peer_dir, args.vllm_python)
        if s.batch_sizes != PEER_BATCHES or s.num_tokens != PEER_TOKENS:
            print(
                f"note: peer.py always measures batch {PEER_BATCHES} with {PEER_TOKENS} tokens",
                file=sys.stderr,
            )
        if s.prompt_len != PROMPT_LEN:
            raise BenchError(f"peer.py's prompts have {PROMPT_LEN} tokens: drop --prompt-len")
    results: list[Result] = []
    for c in cases:
        if side in ("outrider", "both"):
            print(f"outrider {c.target} {c.mode} ...", file=sys.stderr, flush=True)
            results.extend(run_outrider([c], s))
        if side in ("vllm", "both"):
            print(f"vllm {c.target} {c.mode} ...", file=sys.stderr, flush=True)
            results.append(run_vllm(c, peer_dir, args.vllm_python))
    return report_out(args, s, results)


def report_out(args: argparse.Namespace, s: Settings, results: list[Result]) -> dict[str, Any]:
    text, rows = table(results, s.batch_sizes)
    head = caption(s, results)
    print(head + "\n\n" + text + "\n\n" + split_table(results, s.batch_sizes))
    stalls = stall_lines(results, s.batch_sizes)
    if stalls:
        print("\nOne-off work in timed runs:\n" + stalls)
    report = {
        "caption": head,
        "settings": asdict(s),
        "synthetic_acceptance_rates": list(RATES),
        "num_speculative_tokens": K,
        "rows": rows,
        "runs": [
            {
                "side": r.side,
                "shape": r.case.target,
                "mode": r.case.mode,
                "ms": r.ms,
                "ttft_ms": r.ttft_ms,
                "acceptance_length": r.acceptance_length,
                "split": r.split,
                "info": r.info,
            }
            for r in results
        ],
    }
    out = args.json or os.path.join(os.environ.get("OUT", "."), "bench_peer.json")
    Path(out).write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"bench_peer: {e}")
