"""`outrider generate`: JSON output on the embedded model and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

OUTRIDER = str(Path(sys.executable).parent / "outrider")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [OUTRIDER, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_generate_json_on_embedded_model() -> None:
    r = run(
        "generate",
        "--prompt",
        "What is 2+2?",
        "--chat",
        "--max-tokens",
        "8",
        "--no-speculation",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(rec) == {"token_ids", "text", "finish_reason", "prompt_tokens"}
    assert 0 < len(rec["token_ids"]) <= 8
    assert rec["finish_reason"] in ("stop", "length")
    assert rec["prompt_tokens"] > 5


def test_generate_with_ngram_speculation_reports_spec_stats() -> None:
    r = run(
        "generate",
        "--prompt-ids",
        ",".join(["1", "2", "3", "4"] * 6),
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
        "--speculative-config",
        '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}',
    )
    assert r.returncode == 0, r.stderr
    spec = json.loads(r.stdout.strip().splitlines()[-1])["spec"]
    assert spec["method"] == "ngram" and spec["num_speculative_tokens"] == 3
    assert spec["parallel_drafting"] is True and spec["fallback_reason"] is None
    for key in (
        "num_drafts",
        "num_draft_tokens",
        "num_accepted_tokens",
        "accepted_per_position",
        "acceptance_length",
    ):
        assert key in spec


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "/no/such/model", "--prompt", "hi"], "/no/such/model"),
        (["--prompt", "hi", "--max-tokens", "0"], "`max_tokens` must be > 0, got 0"),
        (["--prompt", "hi", "--temperature", "-1"], "`temperature` must be >= 0, got -1.0"),
        (["--prompt", "hi", "--top-p", "1.5"], "`top_p` must be in (0, 1], got 1.5"),
        (["--prompt", "hi", "--top-p", "0"], "`top_p` must be in (0, 1], got 0.0"),
        (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
        (["--prompt", "hi", "--speculative-config", "{bad"], "--speculative-config is not valid"),
        (
            ["--prompt", "hi", "--speculative-config", '{"metod": "ngram"}'],
            "unknown key `speculative.metod`",
        ),
        (["--prompt", "hi", "--config", "/no/such.yaml"], "does not exist"),
        (["--max-tokens", "4"], "give --prompt TEXT or --prompt-ids"),
        (["--prompt-ids", ",".join(["5"] * 9000)], "does not fit max_model_len"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], needle: str) -> None:
    r = run("generate", *args)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr
