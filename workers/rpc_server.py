"""The group leader's gRPC server: generic handlers over msgspec bytes, a deployment token,
message-size limits and the standard ``grpc.health.v1`` service.

Calls are executed one at a time (a worker group steps in lockstep). The server is gRPC's
synchronous one: each RPC runs on a thread of its pool, and a call runs inline on the thread
that received it, so a forward costs no hand-off to another thread or event loop and health
checks are answered from other threads while it runs. Each method is a unary RPC, and the same
calls also run over one persistent bidirectional stream (``Calls``, framed as
``workers/protocol.py`` says), which the router uses: a frame on an open stream costs about
half a unary round trip. A stream's OK reply carries the seconds the worker spent on the call,
from the frame's arrival to its encoded reply, so the router can tell transport from work. The
same frames are also served over a plain TCP socket (``frame_port``; workers/frame_server.py),
which the router prefers for the round's calls.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from outrider.workers.frame_server import FrameServer, Handler, error_frame, run_call
from outrider.workers.protocol import (
    METHODS,
    SERVICE,
    STREAM_METHOD,
    TOKEN_METADATA_KEY,
)

logger = logging.getLogger(__name__)

# NOTE: threads for the server's RPCs: each open stream holds one for its lifetime (the router
# keeps one per group, and a reopened stream's predecessor until it ends), health checks and
# unary calls take one each while they run.
_POOL_THREADS = 16


class WorkerServer:
    def __init__(
        self,
        handler: Handler,
        *,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = 256 * 2**20,
    ) -> None:
        self.handler = handler
        self.token = token
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self._server: grpc.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._health = health.HealthServicer()
        self._frames: FrameServer | None = None
        self.frame_port = 0  # the plain-socket listener's port once started

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _authorized(self, context: grpc.ServicerContext) -> bool:
        meta = dict(context.invocation_metadata() or ())
        return meta.get(TOKEN_METADATA_KEY) == self.token

    def _method(self, name: str) -> grpc.RpcMethodHandler:
        def call(payload: bytes, context: grpc.ServicerContext) -> bytes:
            if not self._authorized(context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
            with self._lock:
                try:
                    return self.handler(name, payload)
                except ValueError as e:
                    error = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except Exception as e:  # noqa: BLE001
                    logger.exception("%s failed", name)
                    error = (grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
            context.abort(*error)
            raise AssertionError("unreachable")

        return grpc.unary_unary_rpc_method_handler(call)

    def _stream(self) -> grpc.RpcMethodHandler:
        names = list(METHODS)

        def calls(frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            if not self._authorized(context):
                # NOTE: refused in a reply frame, not by aborting the stream: a client whose
                # frame raced the abort saw INTERNAL instead of the reason.
                for _ in frames:
                    yield error_frame(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
                    return
                return
            for frame in frames:
                t0 = time.perf_counter()
                if not frame or frame[0] >= len(names):
                    msg = f"unknown method id {frame[0] if frame else None}"
                    yield error_frame(grpc.StatusCode.INVALID_ARGUMENT, msg)
                    continue
                name, payload = names[frame[0]], frame[1:]
                # NOTE: the reply goes out after the lock is released (a slow reader must not
                # hold up health checks and other calls).
                head, body = run_call(self.handler, self._lock, name, payload, t0)
                yield head + body

        return grpc.stream_stream_rpc_method_handler(calls)

    async def start(self) -> str:
        opts = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self._pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="worker-rpc")
        server = grpc.server(self._pool, options=opts)
        handlers = {name: self._method(name) for name in METHODS}
        handlers[STREAM_METHOD] = self._stream()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the worker gRPC server to {self.host}")
        server.start()
        self._frames = FrameServer(
            self.handler,
            self._lock,
            token=self.token,
            host=self.host,
            max_message_bytes=self.max_message_bytes,
        )
        self.frame_port = self._frames.start()
        for service in ("", SERVICE):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        if self._frames is not None:
            self._frames.stop()
            self._frames = None
        if self._server is not None:
            stopped = self._server.stop(grace)
            self._server = None
            await asyncio.to_thread(stopped.wait, grace + 5.0)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
