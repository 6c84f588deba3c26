"""WorkerActor: one Ray actor per device of a worker group.

All ranks join one torch.distributed group (NCCL on GPU, gloo on CPU, plus a gloo group for
control messages). The leader (rank 0) serves the worker protocol over gRPC and broadcasts
each call's bytes to the other ranks, which execute it in lockstep from a follower thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from outrider.workers.config import WorkerConfig
from outrider.workers.distributed import init_parallel_groups
from outrider.workers.protocol import METHODS
from outrider.workers.rpc_server import WorkerServer
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.worker import DrafterWorker, TargetWorker, WorkerHandler

logger = logging.getLogger(__name__)

_METHOD_IDS = {name: i for i, name in enumerate(METHODS)}
_METHOD_NAMES = {i: name for name, i in _METHOD_IDS.items()}
_STOP = -1


class GroupInit(msgspec.Struct, frozen=True):
    """Everything a rank needs to build its worker (sent as msgspec JSON)."""

    role: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    target: WorkerConfig
    speculative: SpeculativeConfig | None = None
    target_num_layers: int = 0
    target_vocab_size: int = 0
    target_moe_backend: str | None = None
    drafter_num_layers: int | None = None
    verification: str = "probabilistic"
    aux_layer_ids: tuple[int, ...] = ()
    synthetic_rates: tuple[float, ...] | None = None
    num_speculative_tokens: int = 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class WorkerActor:
    def __init__(self, rank: int, world_size: int, token: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.token = token
        self.handler: WorkerHandler | None = None
        self.server: WorkerServer | None = None
        self._ctrl: dist.ProcessGroup | None = None
        self._follower: threading.Thread | None = None

    # -- placement info ------------------------------------------------------------------------
    def node_info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        gpus = ray.get_gpu_ids()
        return {
            "rank": self.rank,
            "node_id": ctx.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "device": f"cuda:{gpus[0]}" if gpus else "cpu",
        }

    def pick_port(self) -> int:
        return free_port()

    # -- setup ----------------------------------------------------------------------------------
    def init(
        self,
        master_addr: str,
        master_port: int,
        init: bytes,
        devices: list[str],
        node_ids: list[str],
    ) -> None:
        spec = msgspec.json.decode(init, type=GroupInit)
        cuda = torch.cuda.is_available()
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
        )
        self._ctrl = dist.new_group(backend="gloo")
        init_parallel_groups(self.rank, spec.tensor_parallel_size, spec.pipeline_parallel_size)
        worker: TargetWorker | DrafterWorker
        if spec.role == "target":
            worker = TargetWorker(
                spec.target,
                num_layers=spec.target_num_layers,
                verification=spec.verification,
                aux_layer_ids=spec.aux_layer_ids,
                synthetic_rates=spec.synthetic_rates,
                num_speculative_tokens=spec.num_speculative_tokens,
            )
        else:
            assert spec.speculative is not None
            worker = DrafterWorker(
                spec.speculative,
                spec.target,
                target_vocab_size=spec.target_vocab_size,
                target_num_layers=spec.target_num_layers,
                target_moe_backend=spec.target_moe_backend,
                drafter_num_layers=spec.drafter_num_layers,
            )
        self.handler = WorkerHandler(
            worker,
            tensor_parallel_size=spec.tensor_parallel_size,
            pipeline_parallel_size=spec.pipeline_parallel_size,
            devices=devices,
            node_ids=node_ids,
        )
        if self.rank > 0:
            self._follower = threading.Thread(target=self._follow, name="follower", daemon=True)
            self._follower.start()

    async def serve(self, host: str, max_message_bytes: int) -> str:
        """Leader only: start the gRPC server on this actor's event loop; return its address."""
        assert self.rank == 0 and self.handler is not None
        self.server = WorkerServer(
            self._lead, token=self.token, host=host, max_message_bytes=max_message_bytes
        )
        address = await self.server.start()
        self.handler.frame_port = self.server.frame_port
        return address

    # -- lockstep execution -----------------------------------------------------------------
    def _lead(self, method: str, payload: bytes | memoryview) -> bytes:
        assert self.handler is not None
        if method != "Describe" and self.world_size > 1:
            self._broadcast(_METHOD_IDS[method], payload)
        return self.handler.handle(method, payload)

    def _broadcast(self, method_id: int, payload: bytes) -> None:
        header = torch.tensor([method_id, len(payload)], dtype=torch.int64)
        dist.broadcast(header, src=0, group=self._ctrl)
        if payload:
            body = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            dist.broadcast(body, src=0, group=self._ctrl)

    def _follow(self) -> None:
        assert self.handler is not None
        while True:
            header = torch.empty(2, dtype=torch.int64)
            dist.broadcast(header, src=0, group=self._ctrl)
            method_id, size = int(header[0]), int(header[1])
            if method_id == _STOP:
                return
            body = torch.empty(size, dtype=torch.uint8)
            if size:
                dist.broadcast(body, src=0, group=self._ctrl)
            try:
                self.handler.handle(_METHOD_NAMES[method_id], body.numpy().tobytes())
            except Exception:  # noqa: BLE001
                # NOTE: the leader raises the same error to the caller; followers keep going.
                logger.exception("rank %d: %s failed", self.rank, _METHOD_NAMES[method_id])

    async def shutdown(self) -> None:
        if self.server is not None:
            await self.server.stop()
        if self.rank == 0 and self.world_size > 1 and self._ctrl is not None:
            self._broadcast(_STOP, b"")
