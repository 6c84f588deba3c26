from __future__ import annotations

import os

if os.environ.get("OUTRIDER_TRITON_INTERPRET") == "1":
    # NOTE: read by triton when it is imported (transformers imports it below); see tests/gpu.
    os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    reason = "needs CUDA (run on the device machine; see tests/gpu/README.md)"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


TINY_COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    eos_token_id=3,
    bos_token_id=1,
)


def tiny_config(kind: str, **overrides: Any) -> PretrainedConfig:
    """Small random-model configs of every supported architecture family."""
    common = {**TINY_COMMON, **overrides}
    if kind == "llama":
        return LlamaConfig(**{"intermediate_size": 128, "num_hidden_layers": 4, **common})
    if kind == "qwen3":
        return Qwen3Config(
            **{"intermediate_size": 128, "num_hidden_layers": 4, "head_dim": 32, **common}
        )
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(
            **{
                "intermediate_size": 96,
                "moe_intermediate_size": 32,
                "num_hidden_layers": 4,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "mlp_only_layers": [0],
                **common,
            }
        )
    if kind == "mixtral":
        return MixtralConfig(
            **{
                "intermediate_size": 48,
                "num_hidden_layers": 3,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "sliding_window": None,
                **common,
            }
        )
    raise ValueError(kind)


def randomize(model: torch.nn.Module, scale: float = 0.15) -> None:
    # NOTE: HF's 0.02 init makes attention near-uniform, which would hide rotary/mask bugs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, scale)


TinyFactory = Callable[..., tuple[Path, torch.nn.Module]]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyFactory:
    """``tiny_model(kind, seed=0, **config_overrides) -> (dir, transformers model in float64)``.

    The model is saved with ``save_pretrained`` (so outrider loads it like any HF directory) and
    cached per arguments for the session.
    """
    cache: dict[tuple[Any, ...], tuple[Path, torch.nn.Module]] = {}

    def make(kind: str, seed: int = 0, **overrides: Any) -> tuple[Path, torch.nn.Module]:
        key = (kind, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                tiny_config(kind, **overrides),
                attn_implementation="sdpa",
                experts_implementation="eager",
            ).to(torch.float64)
            randomize(model)
            path = tmp_path_factory.mktemp(f"{kind}-{seed}")
            model.save_pretrained(path)
            cache[key] = (path, model.eval())
        return cache[key]

    return make


class PatternDraftLength:
    """A draft-length policy that cycles a fixed pattern of k (drives the switch-off point
    deterministically); same interface as ``cluster/draft_length.py``'s policies."""

    def __init__(self, max_k: int, pattern: list[int]) -> None:
        self.max_k = max_k
        self.pattern = list(pattern)
        self.num_rounds = 0

    def choose(self, num_decode: int, num_other_tokens: int = 0) -> int:
        k = self.pattern[self.num_rounds % len(self.pattern)]
        self.num_rounds += 1
        return k

    def observe_acceptance(self, drafted: list[tuple[int, int]]) -> None:
        pass

    def observe_verify(self, num_tokens: int, seconds: float) -> None:
        pass

    def observe_draft(
        self, num_steps: int, num_tokens: int, seconds: float, context_tokens: int = 0
    ) -> None:
        pass

    def observe_round(self, k: int, overhead_s: float) -> None:
        pass


@pytest.fixture(scope="session")
def pattern_draft_length() -> type[PatternDraftLength]:
    return PatternDraftLength


@pytest.fixture(scope="session")
def eagle3_helpers() -> ModuleType:
    """tests/integration/test_eagle3.py as a module: its speculators checkpoint writers,
    random tensors, reference cases and proposer builder, for other test files."""
    import importlib.util

    path = Path(__file__).parent / "integration" / "test_eagle3.py"
    spec = importlib.util.spec_from_file_location("outrider_eagle3_test_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()``: a TCP port on 127.0.0.1 that nothing is bound to now."""
    return _free_port


def _wait_serve_app(name: str, timeout_s: float = 300.0) -> None:
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise AssertionError(f"{name}: {status.status}: {status.message}")
        assert time.monotonic() < deadline, f"{name} did not start: {status}"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def wait_serve_app() -> Callable[..., None]:
    """``wait_serve_app(name, timeout_s=300)``: until the Serve application runs (fails on
    DEPLOY_FAILED / UNHEALTHY)."""
    return _wait_serve_app


@pytest.fixture(scope="session")
def deploy_router() -> Callable[..., Any]:
    """``deploy_router(name, config, timeout_s=300) -> handle``: the outrider router as the
    Serve application ``name`` at /name, once it runs."""

    def deploy(name: str, config: Any, timeout_s: float = 300.0) -> Any:
        from ray import serve

        from outrider.cluster.router import build_router_deployment

        serve.run(
            build_router_deployment(config), name=name, route_prefix=f"/{name}", blocking=False
        )
        _wait_serve_app(name, timeout_s)
        return serve.get_app_handle(name)

    return deploy
