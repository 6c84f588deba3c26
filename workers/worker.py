"""One rank of a worker group: builds its runner (target) or proposer (drafter) and serves
the worker protocol's calls on decoded messages.

Every rank of a group handles every call in lockstep; tensor- and pipeline-parallel collectives
inside the forward keep them together, and the group leader's result is the one returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import torch

from outrider.workers.config import WorkerConfig
from outrider.workers.distributed import get_pp_group
from outrider.workers.proposers.base import ProposeItem, Proposer, timed_propose
from outrider.workers.proposers.factory import build_drafter
from outrider.workers.protocol import (
    METHODS,
    Delta,
    DescribeRequest,
    DescribeResponse,
    KVUsage,
    ProposeRequest,
    ProposeResponse,
    ReleaseRequest,
    ReleaseResponse,
    VerifyRequest,
    VerifyResponse,
    from_wire,
    to_wire,
)
from outrider.workers.runner import ModelRunner, resolve_device, resolve_dtype
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.verifier import Verifier, VerifyItem


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """Contiguous layer range of one pipeline stage (earlier stages take the remainder)."""
    if pp_size > num_layers:
        raise ValueError(
            f"pipeline_parallel_size {pp_size} exceeds the model's {num_layers} layers"
        )
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


class TargetWorker:
    role = "target"

    def __init__(
        self,
        cfg: WorkerConfig,
        *,
        num_layers: int,
        verification: str = "probabilistic",
        aux_layer_ids: Sequence[int] = (),
        synthetic_rates: Sequence[float] | None = None,
        num_speculative_tokens: int = 0,
    ) -> None:
        pp = get_pp_group()
        start, end = stage_layers(num_layers, pp.size, pp.rank)
        self.cfg = cfg
        self.runner = ModelRunner(cfg, start_layer=start, end_layer=end, group="target")
        self.verifier = Verifier(
            self.runner,
            verification=verification,
            aux_layer_ids=aux_layer_ids,  # type: ignore[arg-type]
            synthetic_rates=synthetic_rates,
            num_speculative_tokens=num_speculative_tokens,
        )

    def verify(self, req: VerifyRequest) -> VerifyResponse:
        probs = from_wire(req.draft_probs, self.runner.device) if req.draft_probs else None
        items: list[VerifyItem] = []
        row = 0
        for e in req.entries:
            q = None
            if e.has_draft_probs and probs is not None:
                q = probs[row : row + len(e.draft_token_ids)]
                row += len(e.draft_token_ids)
            items.append(
                VerifyItem(
                    Delta(e.seq_id, e.start_pos, e.token_ids), e.draft_token_ids, q, e.params
                )
            )
        res = self.verifier.verify(items)
        hidden = to_wire(res.hidden_states) if res.hidden_states is not None else None
        return VerifyResponse(
            res.output_token_ids,
            res.num_accepted,
            hidden,
            res.hidden_rows,
            res.forward_s,
            res.captured_graphs,
        )

    def release(self, seq_ids: list[int]) -> int:
        known = sum(1 for s in seq_ids if self.runner.kv.has(s))
        self.verifier.release(seq_ids)
        return known

    def describe_fields(self) -> dict[str, object]:
        r = self.runner
        return {
            "model": str(r.cfg.model.path or "embedded:SmolLM2-135M-Instruct"),
            "method": None,
            "attention_backend": r.attention_backend,
            "moe_backend": r.moe_backend,
            "dtype": str(r.dtype).removeprefix("torch."),
            "quantization": r.cfg.model.quantization,
            "max_model_len": r.max_model_len,
            "vocab_size": int(r.hf_config.vocab_size),
            "num_hidden_layers": int(r.hf_config.num_hidden_layers),
            "kv": KVUsage(**r.kv_usage()),
            "capabilities": None,
        }


class DrafterWorker:
    role = "drafter"

    def __init__(
        self,
        spec: SpeculativeConfig,
        target: WorkerConfig,
        *,
        target_vocab_size: int,
        target_num_layers: int,
        target_moe_backend: str | None,
        drafter_num_layers: int | None,
    ) -> None:
        pp = get_pp_group()
        start, end = 0, None
        if drafter_num_layers is not None and pp.size > 1:
            start, end = stage_layers(drafter_num_layers, pp.size, pp.rank)
        self.spec = spec
        self.proposer: Proposer = build_drafter(
            spec,
            target,
            target_vocab_size=target_vocab_size,
            target_num_layers=target_num_layers,
            target_moe_backend=target_moe_backend,
            start_layer=start,
            end_layer=end,
        )
        self.device = resolve_device(spec.device)

    def propose(self, req: ProposeRequest) -> ProposeResponse:
        hidden = from_wire(req.hidden_states, self.device) if req.hidden_states else None
        items: list[ProposeItem] = []
        row = 0
        for e in req.entries:
            h = None
            if hidden is not None and e.hidden_rows:
                h = hidden[row : row + e.hidden_rows]
                row += e.hidden_rows
            items.append(
                ProposeItem(Delta(e.seq_id, e.start_pos, e.token_ids), e.num_draft, h, e.params)
            )
        mode = "parallel" if req.mode == "parallel" else "sequential"
        res = timed_propose(self.proposer, items, mode)
        has = [p is not None for p in res.draft_probs] if res.draft_probs else []
        probs = [p for p in res.draft_probs if p is not None] if res.draft_probs else []
        wire = to_wire(torch.cat(probs)) if probs else None
        return ProposeResponse(res.draft_token_ids, has, wire, res.forward_s, res.captured_graphs)

    def release(self, seq_ids: list[int]) -> int:
        self.proposer.release(seq_ids)
        return len(seq_ids)

    def describe_fields(self) -> dict[str, object]:
        runner = getattr(self.proposer, "runner", None)
        caps = self.proposer.capabilities
        fields: dict[str, object] = {
            "model": str(self.spec.model or self.spec.method),
            "method": self.spec.method,
            "attention_backend": getattr(runner, "attention_backend", "none"),
            "moe_backend": getattr(runner, "moe_backend", "none"),
            "dtype": str(getattr(runner, "dtype", "none")).removeprefix("torch."),
            "quantization": self.spec.quantization or "none",
            "max_model_len": int(getattr(runner, "max_model_len", 0)),
            "vocab_size": int(getattr(getattr(runner, "hf_config", None), "vocab_size", 0)),
            "num_hidden_layers": int(
                getattr(getattr(runner, "hf_config", None), "num_hidden_layers", 0)
            ),
            "kv": KVUsage(**self.proposer.kv_usage()),
            "capabilities": caps,
        }
        return fields


class WorkerHandler:
    """Decodes a call, runs it on this rank's worker, encodes the result."""

    def __init__(
        self,
        worker: TargetWorker | DrafterWorker,
        *,
        tensor_parallel_size: int,
        pipeline_parallel_size: int,
        devices: list[str],
        node_ids: list[str],
    ) -> None:
        self.worker = worker
        self.layout = (tensor_parallel_size, pipeline_parallel_size)
        self.devices = devices
        self.node_ids = node_ids
        self._decoders = {m: msgspec.msgpack.Decoder(req) for m, (req, _) in METHODS.items()}
        self._encoder = msgspec.msgpack.Encoder()
        self.frame_port = 0  # set by whoever starts the server (Describe advertises it)

    def describe(self) -> DescribeResponse:
        return DescribeResponse(
            role=self.worker.role,
            tensor_parallel_size=self.layout[0],
            pipeline_parallel_size=self.layout[1],
            devices=self.devices,
            node_ids=self.node_ids,
            frame_port=self.frame_port,
            **self.worker.describe_fields(),  # type: ignore[arg-type]
        )

    def handle(self, method: str, payload: bytes | memoryview) -> bytes:
        req = self._decoders[method].decode(payload)
        return self._encoder.encode(self.dispatch(method, req))

    def dispatch(self, method: str, req: msgspec.Struct) -> msgspec.Struct:
        w = self.worker
        if method == "Describe":
            assert isinstance(req, DescribeRequest)
            return self.describe()
        if method == "Release":
            assert isinstance(req, ReleaseRequest)
            return ReleaseResponse(w.release(req.seq_ids))
        if method == "Verify":
            if not isinstance(w, TargetWorker):
                raise ValueError("Verify is served by the target group only")
            assert isinstance(req, VerifyRequest)
            return w.verify(req)
        if method == "Propose":
            if not isinstance(w, DrafterWorker):
                raise ValueError("Propose is served by the drafter group only")
            assert isinstance(req, ProposeRequest)
            return w.propose(req)
        raise ValueError(f"unknown method {method!r}")


def default_dtype_name(cfg: WorkerConfig) -> str:
    return str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.device))).removeprefix("torch.")
