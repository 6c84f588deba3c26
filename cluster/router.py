"""The Ray Serve router: one target group + one drafter group, the round loop, the HTTP app.

Each replica builds its own worker groups (so replicas scale as whole target+drafter pairs),
reads the drafter's capabilities from Describe once at start-up (parallel or sequential
drafting, aux layers, fallback reason), and runs continuous batching over gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from outrider.cluster.async_engine import AsyncEngine
from outrider.cluster.config import OutriderConfig, load_config
from outrider.cluster.detokenizer import Detokenizer
from outrider.cluster.draft_length import build_draft_length_policy, lookahead
from outrider.cluster.engine import Call, EngineCore
from outrider.cluster.llm import default_model_name, eos_token_ids
from outrider.cluster.rpc import WorkerClient, message_limit_bytes
from outrider.cluster.scheduler import KVBudget, Scheduler
from outrider.workers.actor import GroupInit
from outrider.workers.group import Placement, WorkerGroup
from outrider.workers.models.loader import has_tokenizer, load_hf_config, load_tokenizer
from outrider.workers.proposers.factory import resolve_speculative
from outrider.workers.protocol import DescribeResponse
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.speculators import is_speculators_dir, load_speculators_config

logger = logging.getLogger("outrider.router")

__version__ = "0.1.0"


def _placement(pool: Any, cluster_has_gpus: bool) -> Placement:
    gpus = pool.num_gpus if pool.num_gpus is not None else (1 if cluster_has_gpus else 0)
    resources = {pool.resource: 1.0} if pool.resource else {}
    return Placement(num_gpus=float(gpus), num_cpus=pool.num_cpus, resources=resources)


def _cluster_has_gpus() -> bool:
    import ray

    return bool(ray.cluster_resources().get("GPU", 0))


class Router:
    """Owns the worker groups and the engine of one Serve replica."""

    def __init__(self, config: OutriderConfig) -> None:
        self.config = config
        self.target_group: WorkerGroup | None = None
        self.drafter_group: WorkerGroup | None = None
        self.target: WorkerClient | None = None
        self.drafter: WorkerClient | None = None
        self.engine: AsyncEngine | None = None
        self.tokenizer: Any = None
        self.target_desc: DescribeResponse | None = None
        self.drafter_desc: DescribeResponse | None = None
        self._hf: Any = None
        self._seen_calls: dict[str, tuple[int, float, float]] = {}

    async def start(self) -> None:
        cfg = self.config
        spec = resolve_speculative(cfg.speculative)
        hf = await asyncio.to_thread(load_hf_config, cfg.target.model.path)
        self._hf = hf
        n_layers, vocab = int(hf.num_hidden_layers), int(hf.vocab_size)
        aux: tuple[int, ...] = ()
        if spec is not None and spec.model and is_speculators_dir(spec.model):
            aux = load_speculators_config(spec.model).resolved_aux_layer_ids(n_layers)
        k = (spec.num_speculative_tokens or 0) if spec is not None else 0
        limit = message_limit_bytes(
            max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
            max_num_seqs=cfg.scheduler.max_num_seqs,
            # NOTE: with overlap a propose returns k + 1 probability rows per sequence.
            num_speculative_tokens=k + (1 if spec is not None and spec.overlap else 0),
            vocab_size=vocab,
            hidden_bytes_per_token=max(len(aux), 1) * int(hf.hidden_size) * 4,
        )
        gpus = await asyncio.to_thread(_cluster_has_gpus)
        tpar = cfg.target.parallel
        target_init = GroupInit(
            "target",
            tpar.tensor_parallel_size,
            tpar.pipeline_parallel_size,
            cfg.target,
            target_num_layers=n_layers,
            target_vocab_size=vocab,
            verification=spec.verification if spec is not None else "probabilistic",
            aux_layer_ids=aux,
            synthetic_rates=spec.synthetic_rates() if spec is not None else None,
            num_speculative_tokens=(spec.num_speculative_tokens or 0) if spec is not None else 0,
        )
        self.target_group = await asyncio.to_thread(
            WorkerGroup,
            "outrider-target",
            target_init,
            _placement(cfg.target.pool, gpus),
            max_message_bytes=limit,
        )
        self.target = WorkerClient(
            self.target_group.address,
            self.target_group.token,
            group="target",
            max_message_bytes=limit,
        )
        self.target_desc = await self.target.describe()
        if spec is not None:
            draft_init = GroupInit(
                "drafter",
                spec.draft_tensor_parallel_size or spec.tensor_parallel_size,
                spec.pipeline_parallel_size,
                cfg.target,
                speculative=spec,
                target_num_layers=n_layers,
                target_vocab_size=vocab,
                target_moe_backend=self.target_desc.moe_backend,
                drafter_num_layers=_draft_layers(spec),
            )
            self.drafter_group = await asyncio.to_thread(
                WorkerGroup,
                "outrider-drafter",
                draft_init,
                _placement(spec.pool, gpus),
                max_message_bytes=limit,
            )
            self.drafter = WorkerClient(
                self.drafter_group.address,
                self.drafter_group.token,
                group="drafter",
                max_message_bytes=limit,
            )
            self.drafter_desc = await self.drafter.describe()
            caps = self.drafter_desc.capabilities
            assert caps is not None
            if tuple(caps.aux_layer_ids) != aux:
                raise RuntimeError(
                    f"drafter wants aux layers {caps.aux_layer_ids}, target captures {aux}"
                )
            if caps.fallback_reason:
                logger.warning(
                    "drafter group drafts sequentially (%s): %s", caps.method, caps.fallback_reason
                )
        self.engine = self._build_engine(spec)
        self.engine.start()

    def _build_engine(self, spec: SpeculativeConfig | None) -> AsyncEngine:
        cfg = self.config
        k = (spec.num_speculative_tokens or 0) if spec is not None else 0
        assert self.target is not None and self.target_desc is not None
        td = self.target_desc
        tok = load_tokenizer(cfg.target.model) if has_tokenizer(cfg.target.model) else None
        self.tokenizer = tok
        budgets = [KVBudget(td.kv.num_blocks, td.kv.block_size)]
        if self.drafter_desc is not None and self.drafter_desc.kv.num_blocks:
            budgets.append(
                KVBudget(self.drafter_desc.kv.num_blocks, self.drafter_desc.kv.block_size)
            )
        scheduler = Scheduler(
            budgets,
            max_num_seqs=cfg.scheduler.max_num_seqs,
            max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
            lookahead=lookahead(spec),
        )
        detok = Detokenizer(tok, eos_token_ids(tok, self._hf), td.max_model_len)
        core = EngineCore(
            self.target,
            detok,
            scheduler,
            drafter=self.drafter,
            num_speculative_tokens=k,
            max_model_len=td.max_model_len,
            synthetic=spec is not None and spec.verification == "synthetic",
            draft_length=build_draft_length_policy(spec, concurrent=True),
            overlap=spec is not None and spec.overlap,
            concurrent_overlap=True,
        )
        name = cfg.server.served_model_name or default_model_name(cfg)
        return AsyncEngine(
            core,
            self._call,
            model_name=name,
            max_queued_requests=cfg.server.max_queued_requests,
            log_interval_s=cfg.server.log_interval_s,
            kv_usage=scheduler.kv_usage,
        )

    async def _call(self, call: Call) -> Any:
        try:
            return await self._dispatch(call)
        finally:
            self._observe_calls()

    def _observe_calls(self) -> None:
        """Feed the calls since the last observation into the metrics, per group."""
        if self.engine is None:
            return
        for group, client in (("target", self.target), ("drafter", self.drafter)):
            if client is None:
                continue
            now = (client.num_calls, client.call_s, client.worker_s)
            last = self._seen_calls.get(group, (0, 0.0, 0.0))
            if now[0] != last[0]:
                self.engine.metrics.on_worker_calls(
                    group, now[0] - last[0], now[1] - last[1], now[2] - last[2]
                )
                self._seen_calls[group] = now

    async def _dispatch(self, call: Call) -> Any:
        kind, args = call
        assert self.target is not None
        if kind == "verify":
            return await self.target.verify(*args)
        if kind == "propose":
            assert self.drafter is not None
            return await self.drafter.propose(*args)
        if kind == "overlap":
            # NOTE: the target verifies round r while the drafter drafts round r + 1.
            assert self.drafter is not None
            items_v, items_p, mode = args
            return await asyncio.gather(
                self.target.verify(items_v), self.drafter.propose(items_p, mode)
            )
        calls = [self.target.release(*args)]
        if self.drafter is not None:
            calls.append(self.drafter.release(*args))
        await asyncio.gather(*calls)
        return None

    async def describe(self) -> dict[str, Any]:
        import msgspec

        out: dict[str, Any] = {}
        if self.target is not None:
            out["target"] = msgspec.to_builtins(await self.target.describe())
            out["target_placement"] = _table(self.target_group)
        if self.drafter is not None:
            out["drafter"] = msgspec.to_builtins(await self.drafter.describe())
            out["drafter_placement"] = _table(self.drafter_group)
        return out

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        for client in (self.target, self.drafter):
            if client is not None:
                await client.close()
        for group in (self.drafter_group, self.target_group):
            if group is not None:
                await asyncio.to_thread(group.shutdown)
        self.target_group = self.drafter_group = None


def _draft_layers(spec: Any) -> int | None:
    if spec.method != "draft_model" or spec.model is None:
        return None
    return int(load_hf_config(spec.model).num_hidden_layers)


def _table(group: WorkerGroup | None) -> dict[str, Any]:
    if group is None:
        return {}
    table = group.placement_table()
    return {
        "placement_group_id": table.get("placement_group_id"),
        "bundles_to_node_id": {str(k): v for k, v in table.get("bundles_to_node_id", {}).items()},
        "bundles": {str(k): v for k, v in table.get("bundles", {}).items()},
        "pids": [n["pid"] for n in group.nodes],
        "devices": [n["device"] for n in group.nodes],
    }


def _log_to_stderr() -> None:
    """The replica's periodic engine line (logger ``outrider``) goes to stderr at INFO."""
    log = logging.getLogger("outrider")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def build_router_deployment(config: OutriderConfig, *, num_replicas: int = 1) -> Any:
    """The Serve application: one router deployment whose ASGI app is the OpenAI ingress."""
    from ray import serve

    from outrider.cluster.ingress import build_app

    @serve.ingress()
    class OutriderRouter:
        async def __init__(self, config_data: dict[str, Any]) -> None:
            _log_to_stderr()
            self.router = Router(load_config(None, config_data))
            await self.router.start()

        def __serve_build_asgi_app__(self) -> Any:
            r = self.router
            assert r.engine is not None
            return build_app(
                r.engine,
                r.tokenizer,
                served_model_name=r.engine.model_name,
                max_model_len=r.engine.core.max_model_len,
                api_key=r.config.server.api_key,
                version=__version__,
            )

        async def describe(self) -> dict[str, Any]:
            return await self.router.describe()

        async def __del__(self) -> None:
            await self.router.shutdown()

    torch.set_num_threads(1)
    deployment = serve.deployment(
        OutriderRouter,
        name="outrider",
        num_replicas=num_replicas,
        max_ongoing_requests=max(config.scheduler.max_num_seqs * 2, 8),
        ray_actor_options={"num_cpus": 0},
    )
    import msgspec

    return deployment.bind(msgspec.to_builtins(config))
