"""gRPC client of the worker protocol, and its adapters to the round loop's interfaces.

Messages are msgspec structs (see ``outrider.workers.protocol``); tensors travel as raw bytes.
Every call carries the deployment token and a deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
import msgspec
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from outrider.workers.proposers.base import DraftMode, ProposeItem, ProposeResult
from outrider.workers.protocol import (
    METHODS,
    SERVICE,
    TOKEN_METADATA_KEY,
    DescribeRequest,
    DescribeResponse,
    DrafterCapabilities,
    ProposeEntry,
    ProposeRequest,
    ProposeResponse,
    ReleaseRequest,
    ReleaseResponse,
    VerifyEntry,
    VerifyRequest,
    VerifyResponse,
    from_wire,
    to_wire,
)
from outrider.workers.verifier import VerifyItem, VerifyResult

R = TypeVar("R", bound=msgspec.Struct)


class WorkerCallError(RuntimeError):
    """A worker call failed; the message names the group, method and gRPC status."""


def message_limit_bytes(
    *,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    num_speculative_tokens: int,
    vocab_size: int,
    hidden_bytes_per_token: int,
) -> int:
    """A limit that fits the largest configured batch: hidden rows plus draft probabilities."""
    hidden = max_num_batched_tokens * hidden_bytes_per_token
    probs = max_num_seqs * max(num_speculative_tokens, 1) * vocab_size * 4
    return int(1.25 * (hidden + probs)) + 16 * 2**20


class WorkerClient:
    def __init__(
        self,
        address: str,
        token: str,
        *,
        group: str,
        timeout_s: float = 120.0,
        max_message_bytes: int = 256 * 2**20,
    ) -> None:
        self.address = address
        self.group = group
        self.timeout_s = timeout_s
        opts = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self._channel = grpc.aio.insecure_channel(address, options=opts)
        self._meta = ((TOKEN_METADATA_KEY, token),)
        self._calls = {name: self._channel.unary_unary(f"/{SERVICE}/{name}") for name in METHODS}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {
            name: msgspec.msgpack.Decoder(resp) for name, (_, resp) in METHODS.items()
        }
        self._caps: DrafterCapabilities | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, name: str, req: msgspec.Struct, timeout: float | None = None) -> Any:
        try:
            raw = await self._calls[name](
                self._encoder.encode(req), metadata=self._meta, timeout=timeout or self.timeout_s
            )
        except grpc.aio.AioRpcError as e:
            raise WorkerCallError(
                f"{self.group} {name} at {self.address} failed: {e.code().name}: {e.details()}"
            ) from None
        return self._decoders[name].decode(raw)

    async def health(self, timeout: float = 5.0) -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def describe(self, timeout: float = 30.0) -> DescribeResponse:
        desc: DescribeResponse = await self._call("Describe", DescribeRequest(), timeout)
        self._caps = desc.capabilities
        return desc

    async def release(self, seq_ids: Sequence[int]) -> int:
        resp: ReleaseResponse = await self._call("Release", ReleaseRequest(list(seq_ids)))
        return resp.num_released

    # -- the target ------------------------------------------------------------------------------
    async def verify(self, items: Sequence[VerifyItem]) -> VerifyResult:
        entries = []
        probs: list[torch.Tensor] = []
        for it in items:
            has = it.draft_probs is not None and bool(it.draft_token_ids)
            if has:
                assert it.draft_probs is not None
                probs.append(it.draft_probs[: len(it.draft_token_ids)])
            d = it.delta
            entries.append(
                VerifyEntry(d.seq_id, d.start_pos, d.token_ids, it.draft_token_ids, has, it.params)
            )
        req = VerifyRequest(entries, to_wire(torch.cat(probs)) if probs else None)
        resp: VerifyResponse = await self._call("Verify", req)
        hidden = from_wire(resp.hidden_states) if resp.hidden_states is not None else None
        return VerifyResult(
            resp.output_token_ids, resp.num_accepted, hidden, resp.hidden_rows, resp.forward_s
        )

    # -- the drafter -----------------------------------------------------------------------------
    @property
    def capabilities(self) -> DrafterCapabilities:
        if self._caps is None:
            raise WorkerCallError(f"{self.group}: call describe() before drafting")
        return self._caps

    async def propose(self, items: Sequence[ProposeItem], mode: DraftMode) -> ProposeResult:
        entries = []
        hidden: list[torch.Tensor] = []
        for it in items:
            rows = 0
            if it.hidden_states is not None:
                hidden.append(it.hidden_states)
                rows = int(it.hidden_states.shape[0])
            d = it.delta
            entries.append(
                ProposeEntry(d.seq_id, d.start_pos, d.token_ids, it.num_draft, rows, it.params)
            )
        req = ProposeRequest(entries, mode, to_wire(torch.cat(hidden)) if hidden else None)
        resp: ProposeResponse = await self._call("Propose", req)
        out_probs: list[torch.Tensor | None] = [None] * len(items)
        if resp.draft_probs is not None:
            flat = from_wire(resp.draft_probs)
            row = 0
            for i, has in enumerate(resp.has_draft_probs):
                if has:
                    n = len(resp.draft_token_ids[i])
                    out_probs[i] = flat[row : row + n]
                    row += n
        return ProposeResult(resp.draft_token_ids, out_probs, resp.forward_s)
