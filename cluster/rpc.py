"""gRPC client of the worker protocol, and its adapters to the round loop's interfaces.

Messages are msgspec structs (see ``outrider.workers.protocol``); tensors travel as raw bytes.
Calls go as frames over one persistent connection per client, each with its own deadline: the
leader's plain socket once its Describe advertised one (workers/frame_server.py), else one
bidirectional gRPC stream (opened on first use with the deployment token, reopened after an
error).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
import msgspec
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from outrider.workers.proposers.base import DraftMode, ProposeItem, ProposeResult
from outrider.workers.protocol import (
    FRAME_HEADER,
    FRAME_HELLO,
    METHODS,
    SERVICE,
    STREAM_METHOD,
    STREAM_METHOD_IDS,
    STREAM_OK,
    STREAM_WORKER_TIME,
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

logger = logging.getLogger(__name__)
_CONNECT_S = 10.0  # to reach the frame socket; past it the calls keep to gRPC
R = TypeVar("R", bound=msgspec.Struct)
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


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
        self._open_stream = self._channel.stream_stream(f"/{SERVICE}/{STREAM_METHOD}")
        self._stream: Any = None  # grpc.aio.StreamStreamCall, opened on first use
        self._stream_lock = asyncio.Lock()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {
            name: msgspec.msgpack.Decoder(resp) for name, (_, resp) in METHODS.items()
        }
        self._caps: DrafterCapabilities | None = None
        self._token = token
        self.max_message_bytes = max_message_bytes
        # NOTE: the round's calls go over the leader's plain socket once Describe advertised
        # it (workers/frame_server.py); until then, or with OUTRIDER_FRAME_SOCKET=0, over the
        # gRPC stream.
        self._frame_port = 0
        self._frames: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        # NOTE: the worker's own seconds on the stream's calls (frame arrival to encoded reply),
        # next to the calls' wall time here: their difference is the transport.
        self.num_calls = 0
        self.call_s = 0.0
        self.worker_s = 0.0

    async def close(self) -> None:
        self._drop_stream()
        self._drop_frames()
        await self._channel.close()

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def _drop_frames(self) -> None:
        if self._frames is not None:
            self._frames[1].close()
            self._frames = None

    def _error(self, name: str, code: str, details: str) -> WorkerCallError:
        return WorkerCallError(f"{self.group} {name} at {self.address} failed: {code}: {details}")

    async def _call(self, name: str, req: msgspec.Struct, timeout: float | None = None) -> Any:
        t0 = time.perf_counter()
        frame = bytes([STREAM_METHOD_IDS[name]]) + self._encoder.encode(req)
        limit = timeout or self.timeout_s
        async with self._stream_lock:
            if self._frame_port and self._frames is None:
                await self._try_connect_frames(name)
            frames = bool(self._frame_port)
            try:
                async with asyncio.timeout(limit):
                    if frames:
                        reply = await self._frame_exchange(name, frame)
                    else:
                        reply = await self._stream_exchange(name, frame)
            except (TimeoutError, asyncio.CancelledError) as e:
                # NOTE: the reply may still come: drop the connection so that it is never read
                # as the next call's; the next call opens a new one.
                if frames:
                    self._drop_frames()
                else:
                    self._drop_stream()
                if isinstance(e, asyncio.CancelledError):
                    raise
                raise self._error(name, "DEADLINE_EXCEEDED", f"no reply in {limit:g} s") from None
        if reply[0] != STREAM_OK:
            status = _STATUS_NAMES.get(reply[0], str(reply[0]))
            raise self._error(name, status, bytes(reply[1:]).decode(errors="replace"))
        body = memoryview(reply)[1 + STREAM_WORKER_TIME.size :]
        out = self._decoders[name].decode(body)
        self.num_calls += 1
        self.worker_s += STREAM_WORKER_TIME.unpack_from(reply, 1)[0]
        self.call_s += time.perf_counter() - t0
        return out

    async def _stream_exchange(self, name: str, frame: bytes) -> bytes:
        """One frame and its reply on the gRPC stream (opened on first use)."""
        if self._stream is None:
            self._stream = self._open_stream(metadata=self._meta)
        stream = self._stream
        try:
            await stream.write(frame)
            reply = await stream.read()
        except Exception:  # noqa: BLE001
            # NOTE: the stream ended (a wrong token, a message over the size limit, the
            # worker gone): report its status and open a new stream on the next call.
            self._stream = None
            code, details = await stream.code(), await stream.details()
            raise self._error(name, code.name, details) from None
        if reply is grpc.aio.EOF:
            self._stream = None
            code, details = await stream.code(), await stream.details()
            raise self._error(name, code.name, details or "the worker closed the stream")
        return bytes(reply)

    async def _frame_exchange(self, name: str, frame: bytes) -> bytes:
        """One frame and its reply on the leader's plain socket (``_call`` connected it)."""
        assert self._frames is not None
        try:
            reader, writer = self._frames
            writer.write(FRAME_HEADER.pack(len(frame)))
            writer.write(frame)
            (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
            if size > self.max_message_bytes:
                self._drop_frames()
                msg = f"reply of {size} bytes exceeds the limit of {self.max_message_bytes}"
                raise self._error(name, "RESOURCE_EXHAUSTED", msg)
            return await reader.readexactly(size)
        except (OSError, asyncio.IncompleteReadError) as e:
            # NOTE: the worker went away or closed the connection (after an error frame it
            # sent, or a stop): the next call connects again.
            self._drop_frames()
            raise self._error(name, "UNAVAILABLE", f"frame socket: {e!r}") from None

    async def _try_connect_frames(self, name: str) -> None:
        """Connect to the advertised frame socket; where it cannot be reached (a firewall, a
        network that passes only the gRPC port), say so once and keep to the gRPC stream."""
        try:
            async with asyncio.timeout(_CONNECT_S):
                self._frames = await self._connect_frames(name)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            logger.warning(
                "%s: the frame socket at port %d is unreachable (%r); the round's calls go over "
                "gRPC",
                self.group,
                self._frame_port,
                e,
            )
            self._frame_port = 0

    async def _connect_frames(self, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = self.address.rsplit(":", 1)[0]
        reader, writer = await asyncio.open_connection(host, self._frame_port, limit=2**20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = FRAME_HELLO + self._token.encode()
        writer.write(FRAME_HEADER.pack(len(hello)) + hello)
        (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
        reply = await reader.readexactly(min(size, 4096))
        if reply[0] != STREAM_OK:
            writer.close()
            status = _STATUS_NAMES.get(reply[0], str(reply[0]))
            raise self._error(name, status, bytes(reply[1:]).decode(errors="replace"))
        return reader, writer

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
        if desc.frame_port and os.environ.get("OUTRIDER_FRAME_SOCKET", "1") != "0":
            self._frame_port = desc.frame_port
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
            resp.output_token_ids,
            resp.num_accepted,
            hidden,
            resp.hidden_rows,
            resp.forward_s,
            resp.captured_graphs,
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
        return ProposeResult(resp.draft_token_ids, out_probs, resp.forward_s, resp.captured_graphs)
