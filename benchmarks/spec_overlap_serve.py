"""Overlap through the served stack: the same drafter with serial rounds, then overlapped ones.

For each configuration it starts `outrider serve` (target and drafter as separate worker
groups, one device each: on GPUs this needs two), runs `outrider bench` at each concurrency,
and reads the server's /metrics for the overlap hit rate and the mean time per round split into
draft, verify and overhead. With ``--acceptance-length`` the verifier accepts at that synthetic
mean (figures are then *synthetic*); without it verification is real and the default drafter
(the target itself) is always right, so every prepared draft is used: an upper bound.

    python benchmarks/spec_overlap_serve.py [--model DIR] [--draft-model DIR] [--k 4]
        [--acceptance-length L] [--concurrency 1,8] [--num-prompts 32] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from outrider.workers.models.loader import resolve_model_path

OUTRIDER = str(Path(sys.executable).parent / "outrider")
METRICS = (
    "outrider_spec_decode_overlap_hits_total",
    "outrider_spec_decode_overlap_misses_total",
    "outrider_spec_decode_round_draft_seconds_sum",
    "outrider_spec_decode_round_draft_seconds_count",
    "outrider_spec_decode_round_verify_seconds_sum",
    "outrider_spec_decode_round_verify_seconds_count",
    "outrider_spec_decode_round_overhead_seconds_sum",
    "outrider_spec_decode_round_overhead_seconds_count",
)


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    out = dict.fromkeys(METRICS, 0.0)
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{[^}]*\} (\S+)$", line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(2))
    return out


def serve(config: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    path = log.with_suffix(".json")
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [OUTRIDER, "serve", "--config", str(path)], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    for _ in range(1800):
        if "serving on" in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"outrider serve did not start; see {log}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="target (default: embedded SmolLM2)")
    ap.add_argument("--draft-model", default=None, help="drafter (default: the target)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--acceptance-length", type=float, default=None)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args()
    draft = args.draft_model or args.model or str(resolve_model_path(None))
    spec: dict[str, Any] = {
        "method": "draft_model",
        "model": draft,
        "num_speculative_tokens": args.k,
    }
    if args.acceptance_length is not None:
        spec |= {"verification": "synthetic", "synthetic_acceptance_length": args.acceptance_length}
    target: dict[str, Any] = {"model": {"dtype": args.dtype}}
    if args.model:
        target["model"]["path"] = args.model
    server = {"host": "127.0.0.1", "port": args.port}
    url = f"http://127.0.0.1:{args.port}"
    configs = [
        ("plain", {"target": target, "server": server}),
        ("serial", {"target": target, "speculative": spec, "server": server}),
        ("overlap", {"target": target, "speculative": {**spec, "overlap": True}, "server": server}),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="outrider-overlap-"))
    for name, config in configs:
        proc = serve(config, workdir / f"{name}.log")
        try:
            for c in (int(x) for x in args.concurrency.split(",")):
                before = scrape(url)
                bench = subprocess.run(
                    [OUTRIDER, "bench", "--url", url, "--concurrency", str(c)]
                    + ["--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens)]
                    + ["--ignore-eos", "--json"],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                m = {key: v - before[key] for key, v in scrape(url).items()}
                report = json.loads(bench.stdout.strip().splitlines()[-1])
                hits, misses = m[METRICS[0]], m[METRICS[1]]
                rate = hits / (hits + misses) if hits + misses else None

                def mean_ms(part: str, m: dict[str, float] = m) -> float:
                    n = m[f"outrider_spec_decode_round_{part}_seconds_count"]
                    return 1e3 * m[f"outrider_spec_decode_round_{part}_seconds_sum"] / max(n, 1)

                print(
                    json.dumps(
                        {
                            "config": name,
                            "concurrency": c,
                            "synthetic": args.acceptance_length is not None,
                            "overlap_hit_rate": rate,
                            "ms_per_round": {
                                p: round(mean_ms(p), 3) for p in ("draft", "verify", "overhead")
                            },
                            "bench": report,
                        }
                    ),
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


if __name__ == "__main__":
    main()
