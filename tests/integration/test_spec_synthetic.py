"""Synthetic acceptance end to end: the verifier, the engine, metrics and `generate --json`."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from outrider.cluster.cli import spec_record
from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.workers.config import CacheConfig, ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.protocol import Delta
from outrider.workers.runner import ModelRunner
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.verifier import Verifier, VerifyItem

RATES = [0.85, 0.5, 0.2]
PROMPT = [5, 6, 7, 8, 9]


def _target(path: object) -> WorkerConfig:
    return WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"),
        cache=CacheConfig(block_size=4, num_blocks=2000),
    )


def _within(hits: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(hits / n - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-12


def test_verifier_accepts_at_the_rates_and_emits_the_targets_token(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, model = tiny_model("llama")
    verifier = Verifier(
        ModelRunner(_target(path), group="target"),
        verification="synthetic",
        synthetic_rates=RATES,
    )
    k, num_seqs, rounds = len(RATES), 48, 25
    gen = torch.Generator().manual_seed(0)
    accepted_at = [0] * k
    total = 0
    checked = 0
    for r in range(rounds):
        items = []
        for s in range(num_seqs):
            drafts = torch.randint(0, 96, (k,), generator=gen).tolist()
            params = SamplingParams(temperature=0, max_tokens=8) if r == 0 else None
            # NOTE: the delta re-states the prompt each round (truncate, then append).
            items.append(VerifyItem(Delta(s, 0, PROMPT), drafts, None, params))
        res = verifier.verify(items)
        for it, out, n in zip(items, res.output_token_ids, res.num_accepted, strict=True):
            assert out[:n] == it.draft_token_ids[:n] and len(out) == n + 1
            for i in range(n):
                accepted_at[i] += 1
            if checked < 12:
                with torch.inference_mode():
                    ctx = torch.tensor([PROMPT + it.draft_token_ids[:n]])
                    want = int(model(ctx).logits[0, -1].argmax())
                assert out[n] == want  # the target's own (greedy) token after the accepted drafts
                checked += 1
        total += num_seqs
    for i, rate in enumerate(RATES):
        assert _within(accepted_at[i], total, rate), (i, accepted_at[i] / total, rate)


def _synthetic_llm(path: object) -> LLM:
    spec = SpeculativeConfig(
        method="ngram",
        num_speculative_tokens=3,
        prompt_lookup_min=1,
        prompt_lookup_max=2,
        verification="synthetic",
        synthetic_acceptance_rates=tuple(RATES),
    )
    return LLM(OutriderConfig(target=_target(path), speculative=spec))


def test_engine_is_labelled_and_reproducible(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 9, 10, 9, 10], [40, 41, 40, 41]]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    ]
    runs = []
    for _ in range(2):
        llm = _synthetic_llm(path)
        runs.append([o.token_ids for o in llm.generate(prompts, params)])
        stats = llm.engine.stats.spec
        assert stats.num_drafts > 0
    assert runs[0] == runs[1]
    assert llm.engine.synthetic
    out = llm.generate([prompts[0]], params[0])[0]
    assert spec_record(llm, out.spec)["synthetic"] is True

    async def metrics_text() -> str:
        engine = llm.async_engine()
        async for _ in engine.generate(prompts[1], params[0]):
            pass
        await engine.stop()
        return engine.metrics.render().decode()

    text = asyncio.run(metrics_text())
    assert 'outrider_spec_decode_synthetic_acceptance{model_name="' in text
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("outrider_spec_decode_synthetic_acceptance{")
    )
    assert line.endswith(" 1.0")


def test_generate_json_labels_synthetic(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    spec = {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 1,
        "verification": "synthetic",
        "synthetic_acceptance_length": 2.5,
    }
    cmd = [str(Path(sys.executable).parent / "outrider"), "generate", "--model", str(path)]
    args = ["--prompt-ids", "5,6,7,5,6,7,5,6", "--max-tokens", "12", "--ignore-eos", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(
        [*cmd, *args, "--speculative-config", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["spec"]["synthetic"] is True
    assert "synthetic acceptance is on" in r.stderr
    bad = {k: v for k, v in spec.items() if k != "verification"}
    r = subprocess.run(
        [*cmd, *args, "--speculative-config", json.dumps(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode != 0
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("outrider: error: `speculative.synthetic_acceptance_length` applies only with")
    )
