"""Where a speculative round's time goes: torch.profiler over bench_peer's in-process setup.

    python3 benchmarks/profile_round.py tgt eagle3 --batch 1 --tokens 64
    python3 benchmarks/profile_round.py moe eagle3 --batch 1 --smoke   # CPU, tiny shapes

Builds the same LLM as ``benchmarks/bench_peer.py`` (random weights at the peer's shapes,
synthetic acceptance, target on cuda:0, drafter on cuda:1 when two GPUs are visible), warms up,
then profiles one greedy generation and prints the ops with the most self CUDA time and the
most self CPU time, and the round split from the engine's stats.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peer as bp  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", choices=sorted(bp.MODES))
    ap.add_argument("mode", choices=bp.MODES["tgt"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--peer-dir", default=".peer")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from outrider.workers.config import SamplingParams

    case = bp.Case(args.target, args.mode)
    if args.mode not in bp.MODES[args.target]:
        sys.exit(f"profile_round: {args.mode} is not run on {args.target}")
    peer_dir = Path(args.peer_dir)
    config_dir = peer_dir if (peer_dir / "tgt" / "config.json").is_file() else bp.SHARED_PEER
    s = bp.Settings(
        config_dir=str(config_dir),
        batch_sizes=(args.batch,),
        num_tokens=args.tokens,
        prompt_len=16 if args.smoke else bp.PROMPT_LEN,
        smoke=args.smoke,
        drafter_device=None,
        attention_backend="auto",
        moe_backend="auto",
        cache_gib=0.02 if args.smoke else 4.0,
    )
    with tempfile.TemporaryDirectory(prefix="profile_round_") as tmp:
        llm, info = bp.build_llm(case, s, Path(tmp))
    print(f"{case}: {info}", flush=True)
    hi = min(bp.PROMPT_ID_HI, llm.runner.hf_config.vocab_size)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, hi) for _ in range(s.prompt_len)] for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0)
    devices = [info["target_device"], info.get("drafter_device") or info["target_device"]]
    llm.generate(prompts, params)
    llm.generate(prompts, params)
    bp._sync(devices)
    before = bp._split_totals(llm.engine.stats)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available() and not args.smoke:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        llm.generate(prompts, params)
        bp._sync(devices)
    split = bp._split_means(before, bp._split_totals(llm.engine.stats))
    print(f"round split (ms per round): {split}", flush=True)
    ka = prof.key_averages()
    if ProfilerActivity.CUDA in activities:
        print(ka.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
