from __future__ import annotations

import pytest
import torch

from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.kernels.attention.torch_ref import BACKEND, dense_attention_reference
from outrider.workers.kv_cache import KVCacheManager, allocate_kv_caches


def _metadata(
    kv: KVCacheManager, seqs: list[tuple[int, int, int]], causal: bool
) -> AttentionMetadata:
    slots, q_start, seq_lens, tables = [], [0], [], []
    for seq_id, start, n in seqs:
        kv.truncate(seq_id, start) if kv.has(seq_id) else None
        slots += kv.append(seq_id, n)
        q_start.append(q_start[-1] + n)
        seq_lens.append(start + n)
        tables.append(kv.block_table(seq_id))
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(tables), width, dtype=torch.int64)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    q_lens = [b - a for a, b in zip(q_start[:-1], q_start[1:], strict=True)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(q_start),
        seq_lens=torch.tensor(seq_lens),
        block_tables=bt,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        causal=causal,
    )


@pytest.mark.parametrize("causal", [True, False])
def test_paged_matches_dense_over_mixed_batch(causal: bool) -> None:
    torch.manual_seed(0)
    n_heads, n_kv, hd, bs = 4, 2, 8, 4
    kv = KVCacheManager(num_blocks=32, block_size=bs)
    (k_cache, v_cache) = allocate_kv_caches(
        1, 32, bs, n_kv, hd, torch.float64, torch.device("cpu")
    )[0]
    # history per sequence, written in a first step (prefill)
    lens = {0: 9, 1: 3, 2: 14}
    hist = {
        s: (
            torch.randn(n, n_kv, hd, dtype=torch.float64),
            torch.randn(n, n_kv, hd, dtype=torch.float64),
        )
        for s, n in lens.items()
    }
    md = _metadata(kv, [(s, 0, n) for s, n in lens.items()], causal=True)
    q0 = torch.randn(sum(lens.values()), n_heads, hd, dtype=torch.float64)
    k0 = torch.cat([hist[s][0] for s in lens])
    v0 = torch.cat([hist[s][1] for s in lens])
    out0 = BACKEND.forward(q0, k0, v0, k_cache, v_cache, md, 0.3)
    off = 0
    for s, n in lens.items():
        ref = dense_attention_reference(q0[off : off + n], hist[s][0], hist[s][1], 0.3, True)
        torch.testing.assert_close(out0[off : off + n], ref)
        off += n
    # second step: a decode (1 token), a verify (4 tokens) and a rollback-and-append (2 tokens)
    step = [(0, 9, 1), (1, 3, 4), (2, 10, 2)]
    md = _metadata(kv, step, causal=causal)
    t = sum(n for _, _, n in step)
    q = torch.randn(t, n_heads, hd, dtype=torch.float64)
    k = torch.randn(t, n_kv, hd, dtype=torch.float64)
    v = torch.randn(t, n_kv, hd, dtype=torch.float64)
    out = BACKEND.forward(q, k, v, k_cache, v_cache, md, 0.3)
    off = 0
    for s, start, n in step:
        kk = torch.cat([hist[s][0][:start], k[off : off + n]])
        vv = torch.cat([hist[s][1][:start], v[off : off + n]])
        ref = dense_attention_reference(q[off : off + n], kk, vv, 0.3, causal)
        torch.testing.assert_close(out[off : off + n], ref)
        off += n
