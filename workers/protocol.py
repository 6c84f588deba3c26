"""Messages between the control plane and a worker group: the unit of work is a delta.

A delta ``(seq_id, start_pos, token_ids)`` tells a worker that sequence ``seq_id`` holds
``token_ids`` from position ``start_pos`` on. The worker first truncates that sequence's KV to
``start_pos`` and then appends, so rollback after a rejection is implicit and retries are
idempotent. Hidden-state rows that travel with a drafter delta are aligned to its tokens: the row
for the token at position p is the target's hidden state at position p - 1 (the one that
produced it); the token at position 0 has none.
"""

from __future__ import annotations

import struct

import msgspec
import torch

from outrider.workers.config import SamplingParams


class Delta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    seq_id: int
    start_pos: int
    token_ids: list[int]

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def num_hidden_rows(self) -> int:
        """Target hidden-state rows that pair with this delta's tokens (none for position 0)."""
        return len(self.token_ids) - (1 if self.start_pos == 0 else 0)


class DrafterCapabilities(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a drafter worker can do; reported by Describe and read by the router."""

    method: str
    parallel_drafting: bool
    needs_target_hidden_states: bool = False
    aux_layer_ids: tuple[int, ...] = ()
    max_k: int = 32
    # Why a method that could draft in parallel does not on this worker; None when it does.
    fallback_reason: str | None = None


# -- the worker protocol (gRPC, msgspec-encoded; no pickle) ------------------------------------
class WireTensor(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A tensor as raw bytes: dtype name, shape, little-endian row-major data."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


class VerifyEntry(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    seq_id: int
    start_pos: int
    token_ids: list[int]
    draft_token_ids: list[int] = []
    has_draft_probs: bool = False
    params: SamplingParams | None = None  # required on a sequence's first call


class VerifyRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    entries: list[VerifyEntry]
    # [sum of k_b over entries with has_draft_probs, V]
    draft_probs: WireTensor | None = None


class VerifyResponse(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    output_token_ids: list[list[int]]
    num_accepted: list[int]
    hidden_states: WireTensor | None = None  # [R, A*H]
    hidden_rows: list[int] = []
    forward_s: float = 0.0  # seconds the group spent in the call (0 from older workers)
    captured_graphs: bool = False  # the call captured CUDA graphs: one-off time in forward_s


class ProposeEntry(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    seq_id: int
    start_pos: int
    token_ids: list[int]
    num_draft: int
    hidden_rows: int = 0
    params: SamplingParams | None = None


class ProposeRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    entries: list[ProposeEntry]
    mode: str = "sequential"
    hidden_states: WireTensor | None = None  # rows of all entries, concatenated


class ProposeResponse(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    draft_token_ids: list[list[int]]
    has_draft_probs: list[bool] = []
    draft_probs: WireTensor | None = None  # [sum k_b of entries with probs, V]
    forward_s: float = 0.0  # seconds the group spent in the call (0 from older workers)
    captured_graphs: bool = False  # the call captured CUDA graphs: one-off time in forward_s


class ReleaseRequest(msgspec.Struct, array_like=True, gc=False, frozen=True):
    seq_ids: list[int]


class ReleaseResponse(msgspec.Struct, array_like=True, gc=False, frozen=True):
    num_released: int


class DescribeRequest(msgspec.Struct, array_like=True, gc=False, frozen=True):
    pass


class KVUsage(msgspec.Struct, omit_defaults=True, frozen=True):
    num_blocks: int = 0
    num_used_blocks: int = 0
    block_size: int = 0
    num_seqs: int = 0


class DescribeResponse(msgspec.Struct, omit_defaults=True, frozen=True):
    role: str
    model: str
    method: str | None
    tensor_parallel_size: int
    pipeline_parallel_size: int
    devices: list[str]
    node_ids: list[str]
    attention_backend: str
    moe_backend: str
    dtype: str
    quantization: str
    max_model_len: int
    vocab_size: int
    num_hidden_layers: int
    kv: KVUsage
    capabilities: DrafterCapabilities | None = None
    # NOTE: the leader's plain-socket port for the round's calls (workers/frame_server.py);
    # 0: none, use the gRPC stream.
    frame_port: int = 0


# (method name, request type, response type); the gRPC path is /outrider.Worker/<name>.
SERVICE = "outrider.Worker"
METHODS: dict[str, tuple[type[msgspec.Struct], type[msgspec.Struct]]] = {
    "Describe": (DescribeRequest, DescribeResponse),
    "Propose": (ProposeRequest, ProposeResponse),
    "Verify": (VerifyRequest, VerifyResponse),
    "Release": (ReleaseRequest, ReleaseResponse),
}
TOKEN_METADATA_KEY = "x-outrider-token"
# NOTE: the round's calls also travel over one persistent bidirectional stream per client
# (/outrider.Worker/Calls): a request frame is one byte of method id (the order of METHODS)
# then the msgspec request; a reply frame is one byte of status, then for STREAM_OK the
# worker's seconds on the call (STREAM_WORKER_TIME: frame arrival to encoded reply) and the
# msgspec response, else (the gRPC status code of the error) the UTF-8 error message. Replies
# come in request order.
STREAM_METHOD = "Calls"
STREAM_METHOD_IDS = {name: i for i, name in enumerate(METHODS)}
STREAM_OK = 0
STREAM_WORKER_TIME = struct.Struct("<d")
# NOTE: the same frames also travel over a plain TCP socket (workers/frame_server.py), each
# behind FRAME_HEADER (its length); a connection opens with FRAME_HELLO + the token.
FRAME_HEADER = struct.Struct("<I")
FRAME_HELLO = b"outrider-frames/1 "


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}


def to_wire(t: torch.Tensor) -> WireTensor:
    """Raw bytes of a tensor (moved to the host); no pickle."""
    t = t.detach().contiguous().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {name} cannot travel on the wire; choices: {', '.join(_DTYPES)}")
    return WireTensor(name, tuple(t.shape), t.view(torch.uint8).numpy().tobytes())


def from_wire(w: WireTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    dtype = _DTYPES.get(w.dtype)
    if dtype is None:
        raise ValueError(f"unknown wire dtype {w.dtype!r}; choices: {', '.join(_DTYPES)}")
    flat = torch.frombuffer(bytearray(w.data), dtype=torch.uint8)
    return flat.view(dtype).reshape(w.shape).to(device)
