"""bench_peer's shared vocabulary: the peer's shapes and modes, the settings, a case's result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED_PEER = REPO.parent / "shared" / "peers" / "vllm"
RATES = (0.72, 0.50, 0.33, 0.22)
K = len(RATES)
# NOTE: the peer's shapes and the modes peer.py runs on each (moe has no P-EAGLE config).
MODES: dict[str, tuple[str, ...]] = {
    "tgt": ("plain", "eagle3", "peagle"),
    "moe": ("plain", "eagle3"),
}
SHAPE_NAMES = {"tgt": "Llama-3.1-8B", "moe": "Qwen3-30B-A3B"}
PEER_BATCHES = (1, 8)
PEER_TOKENS = 256
PROMPT_LEN = 128
PROMPT_ID_HI = 128000
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 16  # peer.py's; outrider raises it to the largest batch asked for
MAX_BATCH = 64
# Smoke: tiny shapes (the peer's configs shrunk), few tokens.
SMOKE_LAYER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
}
SMOKE_TARGET = {
    **SMOKE_LAYER,
    "num_hidden_layers": 4,
    "moe_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SMOKE_DRAFTER = {
    "draft_vocab_size": 128,
    "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
    "mask_token_id": 3,
}


class BenchError(RuntimeError):
    """A one-line reason the benchmark cannot run."""


@dataclass(frozen=True)
class Case:
    target: str  # "tgt" | "moe"
    mode: str  # "plain" | "eagle3" | "peagle"


@dataclass(frozen=True)
class Settings:
    config_dir: str  # folder holding the peer's tgt/eagle3/peagle/moe/moe_eagle3 configs
    batch_sizes: tuple[int, ...]
    num_tokens: int
    prompt_len: int
    smoke: bool
    drafter_device: str | None
    attention_backend: str
    moe_backend: str
    cache_gib: float
    draft_length_policy: str = "fixed"


@dataclass
class Result:
    case: Case
    side: str  # "outrider" | "vllm"
    ms: dict[int, float] = field(default_factory=dict)  # batch -> ms per step
    ttft_ms: dict[int, float] = field(default_factory=dict)
    acceptance_length: dict[int, float | None] = field(default_factory=dict)
    # batch -> per-round means of the timed run: rounds, wall/draft/verify/overhead ms, mean k
    # (plus the slowest rounds and the Triton compiles inside the timed run)
    split: dict[int, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def draft_folder(case: Case) -> str:
    """The peer's drafter config folder of a case (as peer.py names it)."""
    return case.mode if case.target == "tgt" else f"{case.target}_{case.mode}"


def load_config(config_dir: str | Path, name: str) -> dict[str, Any]:
    path = Path(config_dir) / name / "config.json"
    if not path.is_file():
        raise BenchError(f"no peer model config at {path}")
    return json.loads(path.read_text())


def smoke_target(config: dict[str, Any]) -> dict[str, Any]:
    keys = set(SMOKE_TARGET) if config.get("model_type") == "qwen3_moe" else set(SMOKE_LAYER)
    keys.update(("num_hidden_layers", "bos_token_id", "eos_token_id"))
    return {**config, **{k: v for k, v in SMOKE_TARGET.items() if k in keys}}


def smoke_drafter(config: dict[str, Any]) -> dict[str, Any]:
    layer = {**config["transformer_layer_config"], **SMOKE_LAYER}
    out = {**config, **SMOKE_DRAFTER, "transformer_layer_config": layer}
    if "mask_token_id" not in config:
        out.pop("mask_token_id")
    return out
