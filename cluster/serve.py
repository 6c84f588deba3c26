"""``outrider serve``: start (or join) Ray, deploy the router, serve HTTP until a signal.

With no arguments it starts a local Ray cluster on 127.0.0.1, places the embedded target and its
fastest shipped drafter (cluster/default_drafter.py) on the local devices, and serves the OpenAI
API on 127.0.0.1:8000. It stops on SIGINT or SIGTERM and shuts down the Ray cluster it started
(never one it joined).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Any

from outrider.cluster.config import OutriderConfig, load_config
from outrider.cluster.default_drafter import default_speculative

logger = logging.getLogger("outrider.serve")

# NOTE: the fallback drafter when no head is shipped for the embedded model (see
# cluster/default_drafter.py for the default, the fastest shipped head).
FALLBACK_SPECULATIVE: dict[str, Any] = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 2,
    "prompt_lookup_max": 4,
}


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API with disaggregated speculation")
    p.add_argument("--config", help="YAML/JSON config file (outrider schema)")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--api-key", help="require this bearer key (or set OUTRIDER_API_KEY)")
    p.add_argument("--num-replicas", type=int, default=1)
    p.set_defaults(func=cmd_serve)


def resolve_serve_config(args: argparse.Namespace) -> OutriderConfig:
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    key = args.api_key or os.environ.get("OUTRIDER_API_KEY")
    if key:
        server["api_key"] = key
    overrides: dict[str, Any] = {"server": server} if server else {}
    if args.config is None:
        overrides["speculative"] = default_speculative() or FALLBACK_SPECULATIVE
    return load_config(args.config, overrides)


def start_ray() -> bool:
    """Join RAY_ADDRESS if set, else start a local cluster on loopback; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return False
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=max(os.cpu_count() or 1, 4),
        logging_level=logging.WARNING,
    )
    return True


def run_app(cfg: OutriderConfig, num_replicas: int = 1) -> None:
    from ray import serve

    from outrider.cluster.router import build_router_deployment

    serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
    app = build_router_deployment(cfg, num_replicas=num_replicas)
    serve.run(app, name="outrider", route_prefix="/", blocking=False)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.num_replicas < 1:
        raise ValueError(f"--num-replicas must be >= 1, got {args.num_replicas}")
    cfg = resolve_serve_config(args)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.warning("received signal %d, shutting down", signum)
        stop.set()

    started = start_ray()
    # NOTE: installed after ray.init, which replaces the process's SIGTERM handler.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        run_app(cfg, args.num_replicas)
        print(
            f"outrider: serving on http://{cfg.server.host}:{cfg.server.port}/v1 (Ctrl-C to stop)",
            flush=True,
        )
        while not stop.is_set():
            time.sleep(0.2)
    finally:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    return 0
