"""The one configuration schema: load, merge and validate it from YAML, JSON and CLI flags.

The same ``OutriderConfig`` is read by ``outrider serve --config``, ``outrider generate
--config``, ``deploy/serve.yaml`` (as the Serve app's args) and the Helm chart's values. Worker
group settings are the structs of ``outrider.workers.config``; this module adds the control
plane's own (scheduler, server) and the speculative block.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import yaml

from outrider.workers.config import (
    CacheConfig,
    ConfigError,
    KernelConfig,
    ModelConfig,
    ParallelConfig,
    SamplingParams,
    WorkerConfig,
)
from outrider.workers.spec_config import SpeculativeConfig

__all__ = [
    "CacheConfig",
    "ConfigError",
    "KernelConfig",
    "ModelConfig",
    "OutriderConfig",
    "ParallelConfig",
    "SamplingParams",
    "SchedulerConfig",
    "ServerConfig",
    "SpeculativeConfig",
    "WorkerConfig",
    "convert",
    "load_config",
]


class SchedulerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"`scheduler.max_num_seqs` must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                "`scheduler.max_num_batched_tokens` must be >= 1, "
                f"got {self.max_num_batched_tokens}"
            )


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int = 256
    log_interval_s: float = 10.0

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"`server.port` must be in [0, 65535], got {self.port}")
        if self.max_queued_requests < 1:
            raise ConfigError(
                f"`server.max_queued_requests` must be >= 1, got {self.max_queued_requests}"
            )


class OutriderConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    target: WorkerConfig = WorkerConfig()
    speculative: SpeculativeConfig | None = None
    scheduler: SchedulerConfig = SchedulerConfig()
    server: ServerConfig = ServerConfig()

    def validate(self) -> OutriderConfig:
        self.target.model.validate("target.model")
        self.target.parallel.validate("target.parallel")
        self.target.kernels.validate("target.kernels")
        self.target.cache.validate("target.cache")
        self.target.pool.validate("target.pool")
        if self.speculative is not None:
            self.speculative.validate("speculative")
        self.scheduler.validate()
        self.server.validate()
        return self


_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`(?: - at `\$(?P<at>[^`]*)`)?")
_AT = re.compile(r" - at `\$(?P<at>[^`]*)`")


def _struct_at(root: type, path: str) -> type | None:
    cur: Any = root
    for part in [p for p in re.split(r"[.\[\]]", path) if p]:
        if part.isdigit():
            continue
        fields = {f.name: f.type for f in msgspec.structs.fields(cur)} if _is_struct(cur) else {}
        cur = fields.get(part)
        cur = _unwrap(cur)
        if cur is None:
            return None
    return cur if _is_struct(cur) else None


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _unwrap(tp: Any) -> Any:
    args = getattr(tp, "__args__", None)
    if args:
        for a in args:
            if _is_struct(a):
                return a
    return tp


def convert(data: Any, type_: type, *, where: str = "") -> Any:
    """msgspec.convert with errors that name the key and what is allowed."""
    try:
        return msgspec.convert(data, type=type_, strict=False)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = _UNKNOWN.search(msg)
        if m:
            at = (m.group("at") or "").lstrip(".")
            struct = _struct_at(type_, at)
            allowed = sorted(f.name for f in msgspec.structs.fields(struct)) if struct else []
            key = ".".join(p for p in (where, at, m.group("key")) if p)
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            raise ConfigError(f"unknown key `{key}`{hint}") from None
        at_m = _AT.search(msg)
        at = at_m.group("at").lstrip(".") if at_m else ""
        key = ".".join(p for p in (where, at) if p)
        detail = _AT.sub("", msg)
        raise ConfigError(f"`{key or 'config'}`: {detail}" if key else detail) from None


def read_mapping(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(
            f"config file {str(p)!r} is not valid {p.suffix or 'YAML'}: {e}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> OutriderConfig:
    data = read_mapping(path) if path is not None else {}
    if overrides:
        data = deep_merge(data, overrides)
    cfg: OutriderConfig = convert(data, OutriderConfig)
    return cfg.validate()


def to_dict(cfg: msgspec.Struct) -> dict[str, Any]:
    return msgspec.to_builtins(cfg)
