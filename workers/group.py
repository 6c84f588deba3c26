"""WorkerGroup: TP x PP WorkerActors in one Ray placement group on one device pool.

Each rank gets one bundle: a GPU (or a CPU slot) plus one unit of the pool's custom resource
(e.g. ``target_gpu``), so the target and the drafter groups land on disjoint devices of the
pools they name. The leader (rank 0) serves the worker protocol over gRPC on its node address.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgspec

from outrider.workers.actor import GroupInit, WorkerActor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where a group's ranks go: one bundle each of these resources."""

    num_gpus: float = 0.0
    num_cpus: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)
    strategy: str = "PACK"

    def bundle(self) -> dict[str, float]:
        out: dict[str, float] = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        return out


class WorkerGroup:
    def __init__(
        self,
        name: str,
        init: GroupInit,
        placement: Placement,
        *,
        token: str | None = None,
        max_message_bytes: int = 256 * 2**20,
        ready_timeout_s: float = 600.0,
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # NOTE: Ray actor names are unique per namespace; every group (one per Serve replica and
        # role) gets a fresh suffix.
        self.name = f"{name}-{secrets.token_hex(4)}"
        name = self.name
        self.init_spec = init
        self.token = token or secrets.token_hex(16)
        world = init.tensor_parallel_size * init.pipeline_parallel_size
        self.world_size = world
        self.pg = placement_group(
            [placement.bundle() for _ in range(world)], strategy=placement.strategy, name=name
        )
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"worker group {name!r}: {world} bundle(s) of {placement.bundle()} could not be "
                f"placed within {ready_timeout_s:.0f}s; check the cluster's resources"
            ) from None
        remote = ray.remote(WorkerActor)
        self.actors = [
            remote.options(
                num_cpus=placement.num_cpus,
                num_gpus=placement.num_gpus,
                resources=dict(placement.resources),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=i
                ),
                name=f"{name}-rank{i}",
            ).remote(i, world, self.token)
            for i in range(world)
        ]
        self.nodes: list[dict[str, Any]] = ray.get([a.node_info.remote() for a in self.actors])
        leader = self.nodes[0]
        port = ray.get(self.actors[0].pick_port.remote())
        payload = msgspec.json.encode(init)
        devices = [n["device"] for n in self.nodes]
        node_ids = [n["node_id"] for n in self.nodes]
        ray.get(
            [a.init.remote(leader["ip"], port, payload, devices, node_ids) for a in self.actors]
        )
        self.address: str = ray.get(self.actors[0].serve.remote(leader["ip"], max_message_bytes))
        logger.info(
            "worker group %s: %d rank(s) on %s, serving at %s", name, world, devices, self.address
        )

    def placement_table(self) -> dict[str, Any]:
        from ray.util import placement_group_table

        return placement_group_table(self.pg)  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([a.shutdown.remote() for a in self.actors[:1]], timeout=10)
        except Exception:  # noqa: BLE001
            logger.warning("worker group %s did not stop cleanly", self.name)
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)
