"""The group leader's gRPC server: generic handlers over msgspec bytes, a deployment token,
message-size limits and the standard ``grpc.health.v1`` service.

Calls are executed one at a time (a worker group steps in lockstep) on a dedicated thread, so
the event loop stays free to accept health checks while a forward runs. Each method is a unary
RPC, and the same calls also run over one persistent bidirectional stream (``Calls``, framed
as ``workers/protocol.py`` says), which the router uses: a frame on an open stream costs about
half a unary round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from outrider.workers.protocol import (
    METHODS,
    SERVICE,
    STREAM_METHOD,
    STREAM_OK,
    TOKEN_METADATA_KEY,
)

logger = logging.getLogger(__name__)

Handler = Callable[[str, bytes], bytes]


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
        self._server: grpc.aio.Server | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-call")
        self._lock = asyncio.Lock()
        self._health = health.aio.HealthServicer() if hasattr(health, "aio") else None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _method(self, name: str) -> grpc.RpcMethodHandler:
        async def call(payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
            meta = dict(context.invocation_metadata() or ())
            if meta.get(TOKEN_METADATA_KEY) != self.token:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
            loop = asyncio.get_running_loop()
            async with self._lock:
                try:
                    return await loop.run_in_executor(self._executor, self.handler, name, payload)
                except ValueError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except Exception as e:  # noqa: BLE001
                    logger.exception("%s failed", name)
                    await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
            raise AssertionError("unreachable")

        return grpc.unary_unary_rpc_method_handler(call)

    def _stream(self) -> grpc.RpcMethodHandler:
        names = list(METHODS)

        async def calls(
            frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            meta = dict(context.invocation_metadata() or ())
            if meta.get(TOKEN_METADATA_KEY) != self.token:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
            loop = asyncio.get_running_loop()
            async for frame in frames:
                if not frame or frame[0] >= len(names):
                    msg = f"unknown method id {frame[0] if frame else None}"
                    yield bytes([grpc.StatusCode.INVALID_ARGUMENT.value[0]]) + msg.encode()
                    continue
                name, payload = names[frame[0]], frame[1:]
                async with self._lock:
                    try:
                        out = await loop.run_in_executor(
                            self._executor, self.handler, name, payload
                        )
                    except ValueError as e:
                        code, text = grpc.StatusCode.INVALID_ARGUMENT, str(e)
                    except Exception as e:  # noqa: BLE001
                        logger.exception("%s failed", name)
                        code, text = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
                    else:
                        yield bytes([STREAM_OK]) + out
                        continue
                yield bytes([code.value[0]]) + text.encode()

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
        server = grpc.aio.server(options=opts)
        handlers = {name: self._method(name) for name in METHODS}
        handlers[STREAM_METHOD] = self._stream()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        servicer = self._health or health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the worker gRPC server to {self.host}")
        await server.start()
        status = health_pb2.HealthCheckResponse.SERVING
        if self._health is not None:
            await self._health.set("", status)
            await self._health.set(SERVICE, status)
        else:
            servicer.set("", status)
            servicer.set(SERVICE, status)
        self._server = server
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self._executor.shutdown(wait=False, cancel_futures=True)
