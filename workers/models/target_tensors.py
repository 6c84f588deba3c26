"""Read just the target's input embedding and LM head, for drafters that share them.

EAGLE-3 and DFlash checkpoints may omit ``embed_tokens`` / ``lm_head`` and expect the runtime
to take them from the target. Only those tensors are read (and, for GGUF, dequantized):
HF directories name them ``model.embed_tokens.weight`` / ``lm_head.weight``, GGUF files
``token_embd.weight`` / ``output.weight``. A missing head (or ``tie_word_embeddings``) means the
head is the embedding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from outrider.workers.models.base import ModelLoadError
from outrider.workers.models.loader import load_hf_config, resolve_model_path, safetensors_files
from outrider.workers.models.weight_mapping import load_routed, route

SharedTensor = Literal["embed_tokens", "lm_head"]

_HF_NAMES: dict[str, str] = {
    "embed_tokens": "model.embed_tokens.weight",
    "lm_head": "lm_head.weight",
}
_GGUF_NAMES: dict[str, str] = {"embed_tokens": "token_embd.weight", "lm_head": "output.weight"}


def read_target_tensors(
    path: str | None, names: Sequence[SharedTensor]
) -> dict[SharedTensor, torch.Tensor]:
    """``{name: [Vt, Ht] tensor}`` for the requested names of the target at ``path``."""
    resolved = resolve_model_path(path)
    if resolved.is_file() and resolved.suffix == ".gguf":
        return _from_gguf(resolved, names)
    return _from_hf_dir(resolved, names)


def _from_hf_dir(path: Path, names: Sequence[SharedTensor]) -> dict[SharedTensor, torch.Tensor]:
    from safetensors import safe_open

    config = load_hf_config(path)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    files = safetensors_files(path)
    index = path / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})

    def read(name: str) -> torch.Tensor | None:
        candidates = [path / weight_map[name]] if name in weight_map else files
        for file in candidates:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        return None

    out: dict[SharedTensor, torch.Tensor] = {}
    for name in names:
        key = _HF_NAMES["embed_tokens" if name == "lm_head" and tied else name]
        tensor = read(key)
        if tensor is None and name == "lm_head":
            tensor = read(_HF_NAMES["embed_tokens"])
        if tensor is None:
            raise ModelLoadError(f"target checkpoint {path} has no `{key}` tensor")
        out[name] = tensor
    return out


def _from_gguf(path: Path, names: Sequence[SharedTensor]) -> dict[SharedTensor, torch.Tensor]:
    from gguf.quants import dequantize

    from outrider.workers.models.gguf_loader import open_gguf

    tensors = {t.name: t for t in open_gguf(path).tensors}
    out: dict[SharedTensor, torch.Tensor] = {}
    for name in names:
        key = _GGUF_NAMES[name]
        if key not in tensors and name == "lm_head":
            key = _GGUF_NAMES["embed_tokens"]
        if key not in tensors:
            raise ModelLoadError(f"target GGUF file {path} has no `{key}` tensor")
        t = tensors[key]
        w = dequantize(t.data, t.tensor_type)
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    return out


SharedReader = Callable[[Sequence[SharedTensor]], dict[SharedTensor, torch.Tensor]]


def shared_reader(
    target_path: str | None, *, fallback: str | None = None, use_target: bool = True
) -> SharedReader | None:
    """A reader of the target's embed/lm_head at ``target_path`` (None = the embedded model).

    Without a target (``use_target`` false) a local ``fallback`` path, such as a speculators
    checkpoint's verifier, is used when it exists.
    """
    if use_target:
        path = target_path
    elif fallback and Path(fallback).expanduser().exists():
        path = fallback
    else:
        return None

    def read(names: Sequence[SharedTensor]) -> dict[SharedTensor, torch.Tensor]:
        return read_target_tensors(path, names)

    return read


def load_shared_head(
    params: dict[str, torch.nn.Parameter],
    loaded: set[str],
    shared: SharedReader | None,
    *,
    draft_vocab_size: int,
    vocab_size: int,
) -> None:
    """Fill ``embed_tokens`` / ``lm_head`` a draft checkpoint omits from the target's."""
    need: list[SharedTensor] = []
    if "embed_tokens.weight" not in loaded:
        need.append("embed_tokens")
    if "lm_head.weight" not in loaded:
        if draft_vocab_size != vocab_size:
            raise ValueError(
                f"the checkpoint has no lm_head.weight and draft_vocab_size ({draft_vocab_size}) "
                f"differs from vocab_size ({vocab_size}), so the target's head cannot be shared"
            )
        need.append("lm_head")
    if not need:
        return
    if shared is None:
        raise ValueError(
            f"the checkpoint has no {', '.join(n + '.weight' for n in need)} and no target "
            "model was given to share it from"
        )
    for name, tensor in shared(need).items():
        param = f"{name}.weight"
        try:
            load_routed(params, route(param), tensor)
        except ValueError as e:
            raise ValueError(f"the target's {name} cannot be shared: {e}") from None
        loaded.add(param)


def draft_to_target_ids(
    d2t: torch.Tensor | None, *, draft_vocab_size: int, vocab_size: int
) -> torch.Tensor | None:
    """Target ids of the draft vocabulary (``arange(Vd) + d2t``), or None for a full vocab."""
    vd, vt = draft_vocab_size, vocab_size
    if vd == vt:
        # NOTE: as in speculators, a mapping given for a full vocabulary is ignored.
        return None
    if d2t is None:
        raise ValueError(
            f"draft_vocab_size ({vd}) differs from vocab_size ({vt}) but the checkpoint "
            "has no d2t tensor"
        )
    if tuple(d2t.shape) != (vd,):
        raise ValueError(f"d2t has shape {tuple(d2t.shape)}, expected ({vd},)")
    ids = torch.arange(vd, dtype=torch.int64) + d2t.to(torch.int64).cpu()  # [Vd]
    if int(ids.min()) < 0 or int(ids.max()) >= vt or ids.unique().numel() != vd:
        raise ValueError(f"d2t does not map the draft vocabulary into [0, {vt}) one-to-one")
    return ids
