"""Read just the target's input embedding and LM head, for drafters that share them.

EAGLE-3 and DFlash checkpoints may omit ``embed_tokens`` / ``lm_head`` and expect the runtime
to take them from the target. Only those tensors are read (and, for GGUF, dequantized):
HF directories name them ``model.embed_tokens.weight`` / ``lm_head.weight``, GGUF files
``token_embd.weight`` / ``output.weight``. A missing head (or ``tie_word_embeddings``) means the
head is the embedding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from outrider.workers.models.base import ModelLoadError
from outrider.workers.models.loader import load_hf_config, resolve_model_path, safetensors_files

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
