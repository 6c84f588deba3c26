"""Speculators-format drafter checkpoints (eagle3, peagle, dflash): config.json -> settings.

A directory is a speculators checkpoint when its config.json has a ``speculators_config`` key.
Loading follows vLLM: the method and ``num_speculative_tokens`` come from the checkpoint,
``peagle`` is the eagle3 architecture with parallel drafting, and the aux-layer ids use the
capture convention "id k = input to target layer k" (see ../shared/reference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outrider.workers.config import ConfigError

SUPPORTED_TYPES = ("eagle3", "peagle", "dflash")


@dataclass(frozen=True)
class SpeculatorsCheckpoint:
    path: Path
    model_type: str  # eagle3 | peagle | dflash (as written)
    method: str  # eagle3 | dflash (what runs; peagle -> eagle3)
    num_speculative_tokens: int
    parallel_drafting: bool
    aux_layer_ids: tuple[int, ...] | None  # None: the target's default (2, N//2, N-3)
    mask_token_id: int | None
    norm_before_residual: bool
    norm_before_fc: bool
    fc_norm: bool
    norm_output: bool
    draft_vocab_size: int
    target_vocab_size: int
    target_hidden_size: int | None
    transformer_layer_config: dict[str, Any]
    verifier_name_or_path: str | None
    causal: bool  # dflash: attention inside the block
    block_size: int | None

    def resolved_aux_layer_ids(self, num_target_layers: int) -> tuple[int, ...]:
        n = num_target_layers
        ids = self.aux_layer_ids if self.aux_layer_ids is not None else (2, n // 2, n - 3)
        bad = [i for i in ids if not 0 <= i <= n]
        if bad:
            raise ConfigError(
                f"aux hidden-state layer id {bad[0]} of {self.path} is outside [0, {n}] for a "
                f"target with {n} layers"
            )
        return tuple(sorted(set(ids)))


def is_speculators_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "speculators_config" in data


def _req(data: dict[str, Any], key: str, where: str) -> Any:
    cur: Any = data
    for part in key.split("."):
        if isinstance(cur, list):
            if not cur:
                raise ConfigError(f"{where}: `{key}` is missing (empty list)")
            cur = cur[int(part)] if part.isdigit() else None
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise ConfigError(f"{where}: required key `{key}` is missing")
    return cur


def _int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: `{key}` must be an integer, got {value!r}")
    return value


def load_speculators_config(path: str | Path) -> SpeculatorsCheckpoint:
    p = Path(path)
    where = f"speculators checkpoint {p}"
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{where}: config.json not found")
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: config.json is not valid JSON: {e}") from None
    model_type = _req(data, "speculators_model_type", where)
    if model_type not in SUPPORTED_TYPES:
        raise ConfigError(
            f"{where}: `speculators_model_type` {model_type!r} is not supported; "
            f"choices: {', '.join(SUPPORTED_TYPES)}"
        )
    spec_cfg = _req(data, "speculators_config", where)
    if not isinstance(spec_cfg, dict):
        raise ConfigError(f"{where}: `speculators_config` must be an object")
    k = _int(
        _req(data, "speculators_config.proposal_methods.0.speculative_tokens", where),
        "speculators_config.proposal_methods[0].speculative_tokens",
        where,
    )
    if k < 1:
        raise ConfigError(
            f"{where}: `speculators_config.proposal_methods[0].speculative_tokens` must be "
            f">= 1, got {k}"
        )
    verifier = _req(data, "speculators_config.verifier", where)
    if not isinstance(verifier, dict) or "name_or_path" not in verifier:
        raise ConfigError(
            f"{where}: required key `speculators_config.verifier.name_or_path` is missing"
        )
    layer_cfg = _req(data, "transformer_layer_config", where)
    if not isinstance(layer_cfg, dict):
        raise ConfigError(f"{where}: `transformer_layer_config` must be an object")
    vt = _int(
        _req(layer_cfg, "vocab_size", where + " transformer_layer_config"),
        "transformer_layer_config.vocab_size",
        where,
    )
    vd = data.get("draft_vocab_size")
    vd = vt if vd is None else _int(vd, "draft_vocab_size", where)

    aux: tuple[int, ...] | None
    mask: int | None = data.get("mask_token_id")
    causal = True
    block_size = None
    if model_type == "dflash":
        raw = _req(data, "aux_hidden_state_layer_ids", where)
        _req(data, "mask_token_id", where)
        if mask is None:
            raise ConfigError(f"{where}: `mask_token_id` must be set for dflash")
        # NOTE: vLLM treats a missing sliding_window_non_causal as true (non-causal block).
        causal = not bool(data.get("sliding_window_non_causal", True))
        block_size = data.get("block_size")
    else:
        raw = data.get("eagle_aux_hidden_state_layer_ids")
        if model_type == "peagle":
            _req(data, "mask_token_id", where)
            if mask is None:
                raise ConfigError(f"{where}: `mask_token_id` must be set for peagle")
    if raw is None:
        aux = None
    else:
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}: aux hidden-state layer ids must be a non-empty list")
        aux = tuple(_int(i, "aux_hidden_state_layer_ids[]", where) for i in raw)
    if mask is not None:
        mask = _int(mask, "mask_token_id", where)
        if not 0 <= mask < vt:
            raise ConfigError(f"{where}: `mask_token_id` {mask} is outside [0, {vt})")
    # NOTE: norm_before_residual defaults differ: vLLM assumes true for eagle3, false for peagle.
    nbr_default = model_type != "peagle"
    th = data.get("target_hidden_size")
    return SpeculatorsCheckpoint(
        path=p,
        model_type=model_type,
        method="dflash" if model_type == "dflash" else "eagle3",
        num_speculative_tokens=k,
        parallel_drafting=model_type in ("peagle", "dflash"),
        aux_layer_ids=aux,
        mask_token_id=mask,
        norm_before_residual=bool(data.get("norm_before_residual", nbr_default)),
        norm_before_fc=bool(data.get("norm_before_fc", False)),
        fc_norm=bool(data.get("fc_norm", False)),
        norm_output=bool(data.get("norm_output", False)),
        draft_vocab_size=vd,
        target_vocab_size=vt,
        target_hidden_size=None if th is None else _int(th, "target_hidden_size", where),
        transformer_layer_config=layer_cfg,
        verifier_name_or_path=verifier.get("name_or_path"),
        causal=causal,
        block_size=block_size,
    )


def load_for_target(
    model: str | None, method: str, target_vocab_size: int
) -> SpeculatorsCheckpoint:
    """A drafter's checkpoint, checked against the method that runs it and the target's vocab."""
    if model is None:
        raise ConfigError(f"`speculative.model` is required for method {method!r}")
    ckpt = load_speculators_config(model)
    if ckpt.method != method:
        kinds = "eagle3/peagle" if method == "eagle3" else method
        raise ConfigError(f"speculators checkpoint {ckpt.path} is {ckpt.model_type!r}, not {kinds}")
    if ckpt.target_vocab_size != target_vocab_size:
        raise ConfigError(
            f"speculators checkpoint {ckpt.path}: transformer_layer_config.vocab_size "
            f"({ckpt.target_vocab_size}) differs from the target's vocabulary ({target_vocab_size})"
        )
    return ckpt
