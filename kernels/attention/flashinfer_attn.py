"""FlashInfer paged attention over outrider's KV cache, read in place.

* Layout: outrider's per-layer ``(k_cache, v_cache)``, each ``[num_blocks, block_size, nKV, hd]``,
  is FlashInfer's "NHD" paged cache passed as a tuple, so nothing is copied; the block tables
  become CSR page lists once per forward (``paged_csr.py``).
* Kernels: batches whose every sequence has exactly one query token run
  ``BatchDecodeWithPagedKVCacheWrapper`` (tensor-core decode when more than 4 query heads share
  a KV head, as its CUDA-core kernel serves group sizes 1, 2, 3, 4, 6, 8 and 16 only); every other
  batch (prefill, chunked prefill, verify, mixed) runs ``BatchPrefillWithPagedKVCacheWrapper``.
  Causal rows are aligned bottom-right (query i of a sequence sees keys up to
  ``seq_len - q_len + i``), as outrider's metadata says; ``md.causal = False`` (the DFlash block)
  maps to the prefill wrapper's ``causal=False``: every query sees all ``seq_len`` keys. One query
  token sees all keys either way, so decode covers both.
* Planning: ``begin_forward`` (called once per forward by ``forward_context``) builds the page
  lists; the first layer plans the wrapper with them and its head geometry, and every later layer
  of that forward runs on that plan. A wrapper is re-planned only when it last ran another
  forward's plan (several runners in one process share this backend object).
* Memory: one 128 MiB float workspace per device, shared by the wrappers (each forward uses one
  wrapper; kernels run in stream order). Wrappers are created once per (kind, device, dtype,
  head_dim).
* The KV write is the Triton ``reshape_and_cache`` (bit-exact with the torch reference).

Not supported here: CUDA-graph capture (FlashInfer's plan runs on the host; a graph needs its
``use_cuda_graph`` wrappers with fixed buffers) and head dims other than 64, 128 and 256.
"""

from __future__ import annotations

from typing import Any

import torch

from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.kernels.attention.paged_csr import PagedCSR, build_paged_csr
from outrider.kernels.attention.torch_ref import TorchAttentionBackend
from outrider.kernels.attention.triton_kv_write import write_kv

STATE_KEY = "flashinfer"
_WORKSPACE_BYTES = 128 * 2**20
HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
# NOTE: the CUDA-core decode kernel is instantiated for these GQA group sizes only.
_CUDA_CORE_DECODE_GROUPS = (1, 2, 3, 4)


def _decode_uses_tensor_cores(group: int) -> bool:
    return group not in _CUDA_CORE_DECODE_GROUPS


class FlashInferAttentionBackend(TorchAttentionBackend):
    """The ``flashinfer`` attention backend (CUDA, float16/bfloat16)."""

    name = "flashinfer"
    supports_non_causal = True
    # NOTE: plan() does host work and host-to-device copies every forward.
    cuda_graph_safe = False
    write_kv = staticmethod(write_kv)

    def __init__(self) -> None:
        self._workspaces: dict[torch.device, torch.Tensor] = {}
        self._wrappers: dict[tuple[Any, ...], Any] = {}
        # wrapper key -> (the PagedCSR it was last planned with, the plan's geometry, an event
        # recorded after that plan's host-to-device copies)
        self._planned: dict[
            tuple[Any, ...], tuple[PagedCSR, tuple[Any, ...], torch.cuda.Event]
        ] = {}

    # -- per forward --------------------------------------------------------------------------
    def begin_forward(
        self, md: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Build this forward's page lists before any layer runs."""
        if kv_caches and md.num_seqs:
            self._page_lists(md, kv_caches[0][0])

    def _page_lists(self, md: AttentionMetadata, k_cache: torch.Tensor) -> PagedCSR:
        csr = md.backend_state.get(STATE_KEY)
        if csr is None or csr.page_size != k_cache.shape[1]:
            csr = build_paged_csr(md, int(k_cache.shape[1]), k_cache.device)
            md.backend_state[STATE_KEY] = csr
        return csr

    # -- wrappers -----------------------------------------------------------------------------
    def _workspace(self, device: torch.device) -> torch.Tensor:
        ws = self._workspaces.get(device)
        if ws is None:
            # NOTE: FlashInfer's decode wrapper asks for a zeroed workspace on first use.
            ws = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            self._workspaces[device] = ws
        return ws

    def _wrapper(self, key: tuple[Any, ...], device: torch.device) -> Any:
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            import flashinfer

            ws = self._workspace(device)
            if key[0] == "decode":
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    ws, "NHD", use_tensor_cores=key[-1]
                )
            else:
                wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
            self._wrappers[key] = wrapper
        return wrapper

    def _planned_wrapper(
        self,
        csr: PagedCSR,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        causal: bool,
        scale: float,
    ) -> Any:
        _, n_heads, hd = q.shape
        n_kv = int(k_cache.shape[2])
        group = n_heads // n_kv
        decode = csr.max_query_len == 1 and csr.num_tokens == csr.num_seqs
        if decode:
            key: tuple[Any, ...] = (
                "decode",
                q.device,
                q.dtype,
                hd,
                _decode_uses_tensor_cores(group),
            )
        else:
            key = ("prefill", q.device, q.dtype, hd)
        wrapper = self._wrapper(key, q.device)
        geometry = (n_heads, n_kv, hd, q.dtype, k_cache.dtype, float(scale), bool(causal))
        last = self._planned.get(key)
        if last is not None:
            if last[0] is csr and last[1] == geometry:
                return wrapper
            # NOTE: plan() refills a pinned host buffer that the previous plan's queued copy
            # reads; wait for that copy (normally long done) before overwriting it.
            last[2].synchronize()
        if decode:
            wrapper.plan(
                csr.kv_indptr,
                csr.kv_indices,
                csr.kv_last_page_len,
                n_heads,
                n_kv,
                hd,
                csr.page_size,
                q_data_type=q.dtype,
                kv_data_type=k_cache.dtype,
                sm_scale=float(scale),
            )
        else:
            wrapper.plan(
                csr.qo_indptr,
                csr.kv_indptr,
                csr.kv_indices,
                csr.kv_last_page_len,
                n_heads,
                n_kv,
                hd,
                csr.page_size,
                causal=bool(causal),
                sm_scale=float(scale),
                q_data_type=q.dtype,
                kv_data_type=k_cache.dtype,
            )
        planned = torch.cuda.Event()
        planned.record(torch.cuda.current_stream(q.device))
        self._planned[key] = (csr, geometry, planned)
        return wrapper

    # -- attention ----------------------------------------------------------------------------
    def attend(
        self,
        q: torch.Tensor,  # [T, nH, hd]
        k_cache: torch.Tensor,  # [N, bs, nKV, hd]
        v_cache: torch.Tensor,  # [N, bs, nKV, hd]
        md: AttentionMetadata,
        scale: float,
        *,
        out: torch.Tensor | None = None,  # [T, nH, hd], written in full
    ) -> torch.Tensor:
        """Attend packed queries over the paged cache (new K/V must already be written)."""
        t, n_heads, hd = q.shape
        n_kv = int(k_cache.shape[2])
        if out is None:
            out = torch.empty((t, n_heads, hd), dtype=q.dtype, device=q.device)
        if t == 0 or md.num_seqs == 0:
            return out
        if hd not in HEAD_DIMS:
            raise ValueError(
                f"flashinfer attention runs head_dim {', '.join(map(str, HEAD_DIMS))}, got {hd}; "
                "set attention_backend to triton or torch for this model"
            )
        if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
            raise ValueError(
                f"flashinfer attention needs float16/bfloat16 queries and a cache of the same "
                f"dtype, got q {q.dtype}, cache {k_cache.dtype}/{v_cache.dtype}"
            )
        if n_heads % n_kv:
            raise ValueError(f"query heads ({n_heads}) must be a multiple of KV heads ({n_kv})")
        if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError("the K and V caches need equal strides and a contiguous last dim")
        if q.stride(-1) != 1 or q.stride(1) != hd:
            q = q.contiguous()
        csr = self._page_lists(md, k_cache)
        if csr.num_tokens != t:
            raise ValueError(f"metadata describes {csr.num_tokens} query tokens, q has {t}")
        wrapper = self._planned_wrapper(csr, q, k_cache, md.causal, scale)
        wrapper.run(q, (k_cache, v_cache), out=out)
        return out


BACKEND = FlashInferAttentionBackend()
