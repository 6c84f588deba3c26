"""Reference paged attention in torch: the CPU path and the oracle for GPU kernels.

Keys are gathered from the paged cache into a padded ``[B, S, nKV, hd]`` view once per layer,
queries are padded to ``[B, Q, nH, hd]``, and one ``scaled_dot_product_attention`` call runs the
whole batch. The gather indices and the mask depend only on the metadata, so they are built once
per forward and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from outrider.kernels.attention.metadata import AttentionMetadata


def write_kv(
    k: torch.Tensor,  # [T, nKV, hd]
    v: torch.Tensor,  # [T, nKV, hd]
    k_cache: torch.Tensor,  # [N, bs, nKV, hd]
    v_cache: torch.Tensor,  # [N, bs, nKV, hd]
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    """Store new keys and values at their flat cache slots; slots < 0 are skipped."""
    n_kv, hd = k_cache.shape[-2:]
    flat_k = k_cache.view(-1, n_kv, hd)
    flat_v = v_cache.view(-1, n_kv, hd)
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def _plan(md: AttentionMetadata, block_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    plan = md.backend_state.get("torch")
    if plan is not None:
        return plan
    b = md.num_seqs
    max_q, max_s = md.max_query_len, md.max_seq_len
    q_start = md.query_start_loc.to(device)
    q_lens = q_start[1:] - q_start[:-1]  # [B]
    seq_lens = md.seq_lens.to(device)  # [B]
    pos = torch.arange(max_s, device=device)  # [S]
    blocks = md.block_tables.to(device)[
        :, (pos // block_size).clamp(max=md.block_tables.shape[1] - 1)
    ]
    key_slots = blocks * block_size + (pos % block_size)  # [B, S]
    num_tokens = int(q_start[-1])
    tok = torch.arange(num_tokens, device=device)
    seq_of_tok = torch.repeat_interleave(
        torch.arange(b, device=device), q_lens, output_size=num_tokens
    )
    idx_in_seq = tok - q_start[seq_of_tok]
    q_index = seq_of_tok * max_q + idx_in_seq  # [T] row of the padded query
    qi = torch.arange(max_q, device=device)  # [Q]
    valid_key = pos[None, :] < seq_lens[:, None]  # [B, S]
    if md.causal:
        # query i of seq b sits at position seq_len - q_len + i
        q_pos = (seq_lens - q_lens)[:, None] + qi[None, :]  # [B, Q]
        mask = valid_key[:, None, :] & (pos[None, None, :] <= q_pos[:, :, None])  # [B, Q, S]
    else:
        mask = valid_key[:, None, :].expand(b, max_q, max_s)
    # NOTE: padded query rows get key 0 so softmax stays finite; their outputs are dropped.
    pad_row = qi[None, :] >= q_lens[:, None]  # [B, Q]
    mask = mask | (pad_row[:, :, None] & (pos[None, None, :] == 0))
    plan = {"key_slots": key_slots, "q_index": q_index, "mask": mask[:, None]}
    md.backend_state["torch"] = plan
    return plan


def paged_attention(
    q: torch.Tensor,  # [T, nH, hd]
    k_cache: torch.Tensor,  # [N, bs, nKV, hd]
    v_cache: torch.Tensor,  # [N, bs, nKV, hd]
    md: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attend packed queries over the paged cache (new K/V must already be written)."""
    t, n_heads, hd = q.shape
    bs, n_kv = k_cache.shape[1], k_cache.shape[2]
    plan = _plan(md, bs, q.device)
    b, max_q = md.num_seqs, md.max_query_len
    keys = k_cache.view(-1, n_kv, hd)[plan["key_slots"]]  # [B, S, nKV, hd]
    vals = v_cache.view(-1, n_kv, hd)[plan["key_slots"]]
    # NOTE: when every sequence has max_q queries (decode, uniform verify) no padding is needed.
    dense = b * max_q == t
    if dense:
        qp = q.view(b, max_q, n_heads, hd).transpose(1, 2)  # [B, nH, Q, hd]
    else:
        qp = q.new_zeros(b * max_q, n_heads, hd)
        qp[plan["q_index"]] = q
        qp = qp.view(b, max_q, n_heads, hd).transpose(1, 2)  # [B, nH, Q, hd]
    keys = keys.to(q.dtype).transpose(1, 2)  # [B, nKV, S, hd]
    vals = vals.to(q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qp, keys, vals, attn_mask=plan["mask"], scale=scale, enable_gqa=n_kv != n_heads
    )
    out = out.transpose(1, 2).reshape(b * max_q, n_heads, hd)  # [B*Q, nH, hd]
    return out if dense else out[plan["q_index"]]


class TorchAttentionBackend:
    """An attention backend: ``write_kv`` stores new K/V, ``attend`` reads the paged cache.

    Other backends subclass this and replace the two functions.
    """

    name = "torch"
    # NOTE: whether `attend` honours causal=False (the DFlash masked block).
    supports_non_causal = True
    # NOTE: whether `forward` may be captured in a CUDA graph: no host syncs, and correct for
    # any seq_lens at or below md.max_seq_len with max_query_len and max_seq_len fixed at capture
    # (device tensors change between replays; the host lists are empty). This one syncs.
    cuda_graph_safe = False
    write_kv = staticmethod(write_kv)
    attend = staticmethod(paged_attention)
    # NOTE: a backend may offer the rotary, the KV write and the attention as one call, with
    # the signature of triton_decode_rotary.paged_attention_rotary (Attention.forward_rotary).
    attend_rotary: Callable[..., torch.Tensor] | None = None

    def warm_up(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        causal: tuple[bool, ...] = (True,),
    ) -> int:
        """Compile ahead what the first forwards of these shapes would compile on first use;
        returns how many launches it made (0: nothing to compile)."""
        return 0

    def forward(
        self,
        q: torch.Tensor,  # [T, nH, hd]
        k: torch.Tensor,  # [T, nKV, hd]
        v: torch.Tensor,  # [T, nKV, hd]
        k_cache: torch.Tensor,  # [N, bs, nKV, hd]
        v_cache: torch.Tensor,  # [N, bs, nKV, hd]
        md: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self.write_kv(k, v, k_cache, v_cache, md.slot_mapping)
        return self.attend(q, k_cache, v_cache, md, scale)


def dense_attention_reference(
    q: torch.Tensor,  # [Tq, nH, hd]
    k: torch.Tensor,  # [Tk, nKV, hd]
    v: torch.Tensor,  # [Tk, nKV, hd]
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """One sequence, no cache: the plain formula the paged kernels are checked against."""
    tq, tk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        q_pos = torch.arange(tk - tq, tk)[:, None]
        scores = scores.masked_fill(torch.arange(tk)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


BACKEND = TorchAttentionBackend()
