"""The worker protocol over real gRPC and the plain frame socket on 127.0.0.1: results equal
in-process calls."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from outrider.cluster.rpc import WorkerCallError, WorkerClient
from outrider.workers.config import CacheConfig, ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.proposers.base import ProposeItem
from outrider.workers.protocol import FRAME_HEADER, FRAME_HELLO, STREAM_OK, Delta
from outrider.workers.rpc_server import WorkerServer
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.verifier import VerifyItem
from outrider.workers.worker import DrafterWorker, TargetWorker, WorkerHandler


def _cfg(path: object) -> WorkerConfig:
    return WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"), cache=CacheConfig(block_size=4)
    )


@pytest.mark.parametrize("transport", ["frames", "grpc"])
def test_verify_propose_release_describe_over_grpc(tiny_model, transport: str) -> None:  # type: ignore[no-untyped-def]
    """The round's calls over the frame socket (advertised by Describe) or the gRPC stream."""
    path, _ = tiny_model("llama")
    target = TargetWorker(_cfg(path), num_layers=4)
    spec = SpeculativeConfig(method="draft_model", model=str(path), num_speculative_tokens=3)
    drafter = DrafterWorker(
        spec,
        _cfg(path),
        target_vocab_size=96,
        target_num_layers=4,
        target_moe_backend="torch",
        drafter_num_layers=None,
    )
    t_handler = WorkerHandler(
        target, tensor_parallel_size=1, pipeline_parallel_size=1, devices=["cpu"], node_ids=["n0"]
    )
    d_handler = WorkerHandler(
        drafter, tensor_parallel_size=1, pipeline_parallel_size=1, devices=["cpu"], node_ids=["n0"]
    )
    params = SamplingParams(temperature=0.0, max_tokens=8)

    async def main() -> None:
        ts = WorkerServer(t_handler.handle, token="secret")
        ds = WorkerServer(d_handler.handle, token="secret")
        t_addr, d_addr = await ts.start(), await ds.start()
        if transport == "frames":
            t_handler.frame_port, d_handler.frame_port = ts.frame_port, ds.frame_port
        tc = WorkerClient(t_addr, "secret", group="target")
        dc = WorkerClient(d_addr, "secret", group="drafter")
        try:
            assert await tc.health()
            desc = await tc.describe()
            assert desc.frame_port == (ts.frame_port if transport == "frames" else 0)
            assert desc.role == "target" and desc.moe_backend == "torch"
            assert desc.kv.num_used_blocks == 0
            ddesc = await dc.describe()
            assert ddesc.capabilities is not None
            assert ddesc.capabilities.method == "draft_model"
            res = await tc.verify([VerifyItem(Delta(1, 0, [5, 6, 7, 8]), [], None, params)])
            first = res.output_token_ids[0]
            assert len(first) == 1
            prop = await dc.propose(
                [ProposeItem(Delta(1, 0, [5, 6, 7, 8, *first]), 3, None, params)],
                "sequential",
            )
            drafts = prop.draft_token_ids[0]
            assert len(drafts) == 3
            res2 = await tc.verify([VerifyItem(Delta(1, 4, first), drafts, None)])
            # the target drafting for itself accepts every draft
            assert res2.num_accepted == [3] and len(res2.output_token_ids[0]) == 4
            assert (await tc.describe()).kv.num_used_blocks > 0
            assert await tc.release([1]) == 1
            await dc.release([1])
            assert (await tc.describe()).kv.num_used_blocks == 0
            assert (tc._frames is not None) == (transport == "frames")
            assert tc.num_calls >= 6 and 0 < tc.worker_s < tc.call_s
            bad = WorkerClient(t_addr, "wrong", group="target")
            with pytest.raises(WorkerCallError, match="UNAUTHENTICATED"):
                await bad.describe()
            await bad.close()
            with pytest.raises(WorkerCallError, match="INVALID_ARGUMENT"):
                await dc.verify([VerifyItem(Delta(2, 0, [5]), [], None, params)])
            # NOTE: an error reply leaves the client's stream open; a missed deadline drops it
            # and the next call opens a new one.
            assert (await dc.describe()).role == "drafter"
            with pytest.raises(WorkerCallError, match="DEADLINE_EXCEEDED"):
                await tc.describe(timeout=1e-9)
            assert (await tc.describe()).role == "target"
        finally:
            await tc.close()
            await dc.close()
            await ts.stop()
            await ds.stop()

    asyncio.run(main())


def _frame(body: bytes) -> bytes:
    return FRAME_HEADER.pack(len(body)) + body


def _read_frame(conn: socket.socket) -> bytes:
    buf = b""
    while len(buf) < FRAME_HEADER.size:
        buf += conn.recv(FRAME_HEADER.size - len(buf))
    (size,) = FRAME_HEADER.unpack(buf)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        assert chunk, "connection closed mid-frame"
        body += chunk
    return body


def test_frame_socket_checks_token_method_and_size() -> None:
    """The frame socket's hello, a wrong token, an unknown method and an oversized frame."""

    def echo(method: str, payload: bytes) -> bytes:
        if method == "Verify":
            raise ValueError("no verify here")
        return bytes(payload)

    async def main() -> None:
        server = WorkerServer(echo, token="secret", max_message_bytes=1024)
        await server.start()
        try:
            await asyncio.to_thread(check, server.frame_port)
        finally:
            await server.stop()

    def check(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(_frame(FRAME_HELLO + b"wrong"))
            reply = _read_frame(conn)
            assert reply[0] == grpc.StatusCode.UNAUTHENTICATED.value[0]
            assert conn.recv(1) == b""  # closed after the refusal
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(_frame(FRAME_HELLO + b"secret"))
            assert _read_frame(conn) == bytes([STREAM_OK])
            conn.sendall(_frame(bytes([3]) + b"payload"))  # Release: echoed
            reply = _read_frame(conn)
            assert reply[0] == STREAM_OK and reply[9:] == b"payload"
            conn.sendall(_frame(bytes([2]) + b"x"))  # Verify: the handler's ValueError
            reply = _read_frame(conn)
            assert reply[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert reply[1:] == b"no verify here"
            conn.sendall(_frame(bytes([99])))
            assert _read_frame(conn)[1:] == b"unknown method id 99"
            conn.sendall(_frame(bytes([3]) + b"y" * 2000))
            reply = _read_frame(conn)
            assert reply[0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            try:  # closed after the refusal (a reset: the oversized body was never read)
                assert conn.recv(1) == b""
            except ConnectionResetError:
                pass

    asyncio.run(main())


def test_unreachable_frame_socket_falls_back_to_grpc(
    tiny_model, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """A frame port that nothing listens on: the calls go over gRPC, with one warning."""
    path, _ = tiny_model("llama")
    target = TargetWorker(_cfg(path), num_layers=4)
    handler = WorkerHandler(
        target, tensor_parallel_size=1, pipeline_parallel_size=1, devices=["cpu"], node_ids=["n"]
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        handler.frame_port = s.getsockname()[1]  # closed again below: nothing listens there

    async def main() -> None:
        server = WorkerServer(handler.handle, token="t")
        client = WorkerClient(await server.start(), "t", group="target")
        try:
            assert (await client.describe()).frame_port == handler.frame_port
            params = SamplingParams(temperature=0.0, max_tokens=4)
            res = await client.verify([VerifyItem(Delta(1, 0, [5, 6, 7]), [], None, params)])
            assert len(res.output_token_ids[0]) == 1
            assert client._frames is None and client.num_calls == 2
        finally:
            await client.close()
            await server.stop()

    with caplog.at_level("WARNING", logger="outrider.cluster.rpc"):
        asyncio.run(main())
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
