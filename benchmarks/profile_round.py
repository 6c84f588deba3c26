"""Where a speculative round's time goes: torch.profiler over bench_peer's in-process setup.

    python3 benchmarks/profile_round.py tgt eagle3 --batch 1 --tokens 64
    python3 benchmarks/profile_round.py moe eagle3 --batch 1 --smoke   # CPU, tiny shapes
    python3 benchmarks/profile_round.py moe eagle3 --trace $OUT/moe.json.gz --cprofile

Builds the same LLM as ``benchmarks/bench_peer.py`` (``peer_outrider.build_llm``: random
weights at the peer's shapes, synthetic acceptance, target on cuda:0, drafter on cuda:1 when two
GPUs are visible), warms up, then profiles one greedy generation and prints the ops with the
most self CUDA time and the most self CPU time, and the round split from the engine's stats.
``--trace`` also writes the profiler's timeline (Chrome trace format, gzipped: GPU idle gaps and
the host work beside them); ``--cprofile`` profiles one more generation with cProfile and prints
the Python functions with the most time (own and cumulative), for host-bound rounds.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import os
import pstats
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_common as pc  # noqa: E402
import peer_outrider as po  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", choices=sorted(pc.MODES))
    ap.add_argument("mode", choices=pc.MODES["tgt"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--peer-dir", default=".peer")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--drafter-device", default=None, help="default: cuda:1 with two GPUs")
    ap.add_argument("--trace", default=None, help="write the timeline here (.json.gz)")
    ap.add_argument("--cprofile", action="store_true", help="also print a cProfile summary")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from outrider.workers.config import SamplingParams

    case = pc.Case(args.target, args.mode)
    if args.mode not in pc.MODES[args.target]:
        sys.exit(f"profile_round: {args.mode} is not run on {args.target}")
    peer_dir = Path(args.peer_dir)
    config_dir = peer_dir if (peer_dir / "tgt" / "config.json").is_file() else pc.SHARED_PEER
    s = pc.Settings(
        config_dir=str(config_dir),
        batch_sizes=(args.batch,),
        num_tokens=args.tokens,
        prompt_len=16 if args.smoke else pc.PROMPT_LEN,
        smoke=args.smoke,
        drafter_device=args.drafter_device,
        attention_backend="auto",
        moe_backend="auto",
        cache_gib=0.02 if args.smoke else 4.0,
    )
    with tempfile.TemporaryDirectory(prefix="profile_round_") as tmp:
        llm, info = po.build_llm(case, s, Path(tmp))
    print(f"{case}: {info}", flush=True)
    hi = min(pc.PROMPT_ID_HI, llm.runner.hf_config.vocab_size)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, hi) for _ in range(s.prompt_len)] for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0)
    devices = [info["target_device"], info.get("drafter_device") or info["target_device"]]
    llm.generate(prompts, params)
    llm.generate(prompts, params)
    po.sync_devices(devices)
    before = po.split_totals(llm.engine.stats)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available() and not args.smoke:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        llm.generate(prompts, params)
        po.sync_devices(devices)
    split = po.split_means(before, po.split_totals(llm.engine.stats))
    print(f"round split (ms per round): {split}", flush=True)
    ka = prof.key_averages()
    if ProfilerActivity.CUDA in activities:
        print(ka.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        write_trace(prof, args.trace)
    if args.cprofile:
        before = po.split_totals(llm.engine.stats)
        pr = cProfile.Profile()
        pr.enable()
        llm.generate(prompts, params)
        po.sync_devices(devices)
        pr.disable()
        split = po.split_means(before, po.split_totals(llm.engine.stats))
        print(f"round split under cProfile (ms per round): {split}", flush=True)
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(args.rows)
            print(buf.getvalue())


def write_trace(prof: object, path: str) -> None:
    raw = path.removesuffix(".gz")
    prof.export_chrome_trace(raw)  # type: ignore[attr-defined]
    if path.endswith(".gz"):
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
