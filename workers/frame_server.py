"""The round's calls over a plain TCP socket: the same frames as the gRPC ``Calls`` stream,
each behind a 4-byte length.

gRPC in Python costs a round trip of 0.35 ms on a busy loopback and 0.85 ms or more after the
idle of a forward, against 0.06 and 0.5 ms for a plain socket on the same machine
(docs/benchmarks.md); with two calls per round that alone exceeds the router's overhead budget.
So the group leader also listens here, next to its gRPC server, and advertises the port in
``Describe`` (``frame_port``); the router sends Propose/Verify/Release (and later Describes)
this way and keeps gRPC for the first Describe, health checks and as the path when the port is
not advertised or ``OUTRIDER_FRAME_SOCKET=0``.

A connection starts with a hello frame, ``FRAME_HELLO`` followed by the deployment token; the
reply is a one-byte status frame (``STREAM_OK``, else the gRPC status code and a message, and
the connection closes). Then each request frame is answered by one reply frame, in order. A
frame over the size limit is refused with RESOURCE_EXHAUSTED and the connection closed. Calls
run inline on the connection's thread under the server's lock (one call at a time per group).
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable

import grpc

from outrider.workers.protocol import (
    FRAME_HEADER,
    FRAME_HELLO,
    METHODS,
    STREAM_OK,
    STREAM_WORKER_TIME,
)

logger = logging.getLogger(__name__)

Handler = Callable[[str, bytes | memoryview], bytes]
_SMALL = 1 << 16  # replies below this size go out as one write


def _recv_exact(conn: socket.socket, n: int) -> bytearray | None:
    """Exactly n bytes, or None when the peer closed the connection first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            return None
        got += k
    return buf


def _send(conn: socket.socket, *parts: bytes) -> None:
    size = sum(len(p) for p in parts)
    header = FRAME_HEADER.pack(size)
    if size < _SMALL:
        conn.sendall(b"".join((header, *parts)))
        return
    conn.sendall(header)
    for p in parts:
        conn.sendall(p)


def error_frame(code: grpc.StatusCode, text: str) -> bytes:
    """A reply frame's body for a failed call: the gRPC status code, then the message."""
    return bytes([code.value[0]]) + text.encode()


def run_call(
    handler: Handler, lock: threading.Lock, name: str, payload: bytes | memoryview, t0: float
) -> tuple[bytes, bytes]:
    """One call under the group's lock, as its reply frame in two parts: STREAM_OK with the
    worker's seconds since ``t0`` and the encoded response, or an error frame and nothing.
    ValueError is the caller's mistake (INVALID_ARGUMENT); anything else is INTERNAL."""
    with lock:
        try:
            out = handler(name, payload)
        except ValueError as e:
            return error_frame(grpc.StatusCode.INVALID_ARGUMENT, str(e)), b""
        except Exception as e:  # noqa: BLE001
            logger.exception("%s failed", name)
            return error_frame(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"), b""
    return bytes([STREAM_OK]) + STREAM_WORKER_TIME.pack(time.perf_counter() - t0), out


class FrameServer:
    def __init__(
        self,
        handler: Handler,
        lock: threading.Lock,
        *,
        token: str,
        host: str,
        max_message_bytes: int,
    ) -> None:
        self.handler = handler
        self.lock = lock
        self.token = token.encode()
        self.host = host
        self.max_message_bytes = max_message_bytes
        self.port = 0
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(16)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        threading.Thread(target=self._accept, name="frame-accept", daemon=True).start()
        return self.port

    def stop(self) -> None:
        self._stopped.set()
        if self._sock is not None:
            # NOTE: shutdown wakes the thread blocked in accept(); close alone may not.
            for s in (self._sock, *self._conns_snapshot()):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sock = None

    def _conns_snapshot(self) -> list[socket.socket]:
        with self._conns_lock:
            return list(self._conns)

    def _accept(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while not self._stopped.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # the listening socket was closed by stop()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._conns_lock:
                self._conns.add(conn)
            worker = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._hello(conn):
                self._calls(conn)
        except OSError:
            pass  # the peer went away, or stop() closed the socket
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _read_frame(self, conn: socket.socket) -> bytearray | None:
        header = _recv_exact(conn, FRAME_HEADER.size)
        if header is None:
            return None
        (size,) = FRAME_HEADER.unpack(header)
        if size > self.max_message_bytes:
            msg = f"frame of {size} bytes exceeds the limit of {self.max_message_bytes}"
            _send(conn, error_frame(grpc.StatusCode.RESOURCE_EXHAUSTED, msg))
            return None
        return _recv_exact(conn, size)

    def _hello(self, conn: socket.socket) -> bool:
        frame = self._read_frame(conn)
        if frame is None:
            return False
        magic, token = bytes(frame[: len(FRAME_HELLO)]), bytes(frame[len(FRAME_HELLO) :])
        if magic != FRAME_HELLO or not hmac.compare_digest(token, self.token):
            _send(conn, error_frame(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token"))
            return False
        _send(conn, bytes([STREAM_OK]))
        return True

    def _calls(self, conn: socket.socket) -> None:
        names = list(METHODS)
        while True:
            frame = self._read_frame(conn)
            if frame is None:
                return
            t0 = time.perf_counter()
            if not frame or frame[0] >= len(names):
                msg = f"unknown method id {frame[0] if frame else None}"
                _send(conn, error_frame(grpc.StatusCode.INVALID_ARGUMENT, msg))
                continue
            name, payload = names[frame[0]], memoryview(frame)[1:]
            head, body = run_call(self.handler, self.lock, name, payload, t0)
            _send(conn, head, body)  # NOTE: after the lock: a slow reader holds up no other call
