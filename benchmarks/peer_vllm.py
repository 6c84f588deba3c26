"""bench_peer's vLLM side: peer.py (staged through ../shared/peers/vllm) run per case."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from peer_common import BenchError, Case, Result

_PEER_LINE = re.compile(
    r"^\[(?P<target>\S+) (?P<mode>\S+)\] batch (?P<batch>\d+): (?P<ms>[\d.]+) ms per step-token"
    r".*TTFT~(?P<ttft>\d+) ms"
)


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = "/tmp/site" + (f":{old}" if old else "")
    return env


def check_vllm(peer_dir: Path, python: str) -> None:
    script = peer_dir / "peer.py"
    how = (
        "stage it as docs/benchmarks.md says (python3 ../shared/devicekit/stage.py vllm==0.26.0 "
        "... --out .devkit-vl, then copy ../shared/peers/vllm/* into .devkit-vl/)"
    )
    if not script.is_file():
        raise BenchError(f"vLLM is not staged: {script} does not exist; {how}")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    r = subprocess.run([python, "-c", probe], env=peer_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"vLLM is not importable by {python} with /tmp/site on PYTHONPATH; {how}")


def parse_peer(text: str, case: Case) -> Result:
    result = Result(case, "vllm")
    for line in text.splitlines():
        m = _PEER_LINE.match(line.strip())
        if m is None:
            continue
        bs = int(m["batch"])
        result.ms[bs] = float(m["ms"])
        result.ttft_ms[bs] = float(m["ttft"])
    return result


def run_vllm(case: Case, peer_dir: Path, python: str) -> Result:
    cmd = [python, str(peer_dir / "peer.py"), case.mode, case.target]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=peer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("["):
            print(f"  vllm: {line.rstrip()}", file=sys.stderr, flush=True)
    rc = proc.wait()
    text = "".join(lines)
    if rc != 0:
        tail = "".join(lines[-20:])
        raise BenchError(f"{' '.join(cmd)} exited with {rc}; last lines:\n{tail}")
    result = parse_peer(text, case)
    if not result.ms:
        raise BenchError(f"no timing lines in the output of {' '.join(cmd)}:\n{text[-2000:]}")
    result.info["wall_s"] = round(time.perf_counter() - t0, 1)
    return result
