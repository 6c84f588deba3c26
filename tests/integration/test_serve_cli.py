"""`outrider serve` with no config: local Ray on loopback, embedded target + drafter, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil

from outrider.cluster.llm import EMBEDDED_MODEL_NAME

OUTRIDER = str(Path(sys.executable).parent / "outrider")


def test_serve_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [OUTRIDER, "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 300
        while "serving on" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "outrider serve did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        models = [m.id for m in client.models.list().data]
        assert models == [EMBEDDED_MODEL_NAME]
        reply = client.chat.completions.create(
            model=EMBEDDED_MODEL_NAME,
            messages=[{"role": "user", "content": "Say hi."}],
            temperature=0,
            max_tokens=8,
        )
        assert reply.choices[0].message.content
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the Ray processes it started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        gone, alive = psutil.wait_procs(children, timeout=60)
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
