"""The run card of a trained drafter: README.md (data, settings, curve, results) + loss.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import torch

from outrider.train.config import TrainConfig
from outrider.train.data import Sample
from outrider.train.plot import plot_curves
from outrider.train.vocab import DraftVocab


def write_card(
    out: Path,
    cfg: TrainConfig,
    state: Any,
    *,
    samples: list[Sample],
    vocab: DraftVocab,
    counts: torch.Tensor,
    size_bytes: int,
    mask_token_id: int,
) -> None:
    log = state.log
    steps = [r.step for r in log]
    plot_curves(out / "loss.png", steps, [[r.loss for r in log]])
    response_tokens = sum(len(s.output_token_ids) for s in samples)
    topics = sorted({s.topic for s in samples})
    last = log[-1] if log else None
    facts = {
        "method": cfg.method,
        "target": cfg.target_name or cfg.target or "SmolLM2-135M-Instruct (embedded GGUF)",
        "samples": len(samples),
        "prompt_tokens": sum(len(s.prompt_token_ids) for s in samples),
        "response_tokens": response_tokens,
        "greedy_responses": sum(1 for s in samples if s.greedy),
        "topics": len(topics),
        "draft_vocab_size": vocab.draft_vocab_size,
        "draft_vocab_coverage": round(vocab.coverage(counts), 4),
        "mask_token_id": mask_token_id if cfg.method != "eagle3" else None,
        "steps": state.step,
        "train_seconds": round(state.seconds, 1),
        "safetensors_bytes": size_bytes,
        "final_loss": None if last is None else round(last.loss, 4),
        "train_acceptance_length": None if last is None else round(last.acceptance_length, 3),
        "train_accuracy_per_position": None
        if last is None
        else [round(a, 3) for a in last.accuracy],
    }
    (out / "run.json").write_text(
        json.dumps(
            {
                "facts": facts,
                "config": msgspec.to_builtins(cfg),
                "log": [r.__dict__ for r in log],
            },
            indent=1,
        )
        + "\n"
    )
    refresh_card(out)


def refresh_card(out: Path) -> None:
    """Render README.md from run.json (training), eval.json (held-out evaluation) and any
    eval-<where>.json (the same evaluation on another machine)."""
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    facts = run.get("facts", {})
    method = facts.get("method", out.name)
    lines = [
        f"# {method} drafter for {facts.get('target', 'its target')}",
        "",
        "Trained by `outrider train-drafter` (self-distillation, KL to the target over the draft "
        "vocabulary). Loads as a speculators-format checkpoint.",
        "",
        "| fact | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts.items()],
        "",
        "Loss curve (log-scale y, steps on x): ![loss](loss.png)",
        "",
    ]
    log = run.get("log") or []
    if log:
        first, last = log[0], log[-1]
        lines += [
            f"The loss goes from {first['loss']:.3f} (step {first['step']}) to "
            f"{last['loss']:.3f} (step {last['step']}) over {last['seconds']:.0f} s.",
            "",
        ]
    evals = out / "eval.json"
    if evals.is_file():
        lines += [
            "Held-out evaluation (`eval.json`):",
            "",
            "```json",
            evals.read_text().strip(),
            "```",
            "",
        ]
    for extra in sorted(out.glob("eval-*.json")):
        lines += [
            f"Held-out evaluation elsewhere (`{extra.name}`):",
            "",
            "```json",
            extra.read_text().strip(),
            "```",
            "",
        ]
    if run.get("config"):
        lines += ["Settings:", "", "```json", json.dumps(run["config"], indent=1), "```", ""]
    (out / "README.md").write_text("\n".join(lines))
