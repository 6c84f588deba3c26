"""Block tables as CSR page lists (FlashInfer's paged-KV description), checked slot by slot
against the KV manager's own slots; and the per-forward hook that builds them."""

from __future__ import annotations

import random

import pytest
import torch

from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.kernels.attention.paged_csr import build_paged_csr
from outrider.workers.forward_context import ForwardContext, forward_context
from outrider.workers.kv_cache import KVCacheManager


def _batch(
    block_size: int, rng: random.Random, host_lists: bool = True
) -> tuple[AttentionMetadata, list[list[int]]]:
    """A runner-like batch after interleaved appends, rollbacks and frees (scattered blocks).

    Returns the metadata and, per sequence, the flat cache slot of each of its positions.
    """
    kv = KVCacheManager(num_blocks=400, block_size=block_size)
    for _ in range(60):
        seq = rng.randrange(12)
        kv.append(seq, rng.randrange(1, 3 * block_size))
        if rng.random() < 0.3:
            kv.truncate(seq, rng.randrange(kv.num_tokens(seq) + 1))
        if rng.random() < 0.05:
            kv.free(rng.randrange(12))
    seqs = kv.seq_ids()
    q_lens = [min(kv.num_tokens(s), rng.choice([0, 1, 1, 5, 17])) for s in seqs]
    seq_lens = [kv.num_tokens(s) for s in seqs]
    tables = [kv.block_table(s) for s in seqs]
    width = max(max(len(t) for t in tables), 1) + 2  # wider than needed, as a padded runner's
    bt = torch.zeros(len(seqs), width, dtype=torch.int64)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int64)
    q_start = [0]
    for n in q_lens:
        q_start.append(q_start[-1] + n)
    md = AttentionMetadata(
        slot_mapping=torch.zeros(q_start[-1], dtype=torch.int64),
        query_start_loc=torch.tensor(q_start),
        seq_lens=torch.tensor(seq_lens),
        block_tables=bt,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=q_lens if host_lists else [],
        seq_lens_cpu=seq_lens if host_lists else [],
    )
    slots = [
        [t[p // block_size] * block_size + p % block_size for p in range(n)]
        for t, n in zip(tables, seq_lens, strict=True)
    ]
    return md, slots


@pytest.mark.parametrize("host_lists", [True, False])
@pytest.mark.parametrize("block_size", [1, 5, 16, 32])
def test_page_lists_address_exactly_each_sequences_slots(block_size: int, host_lists: bool) -> None:
    rng = random.Random(block_size * 7 + host_lists)
    md, slots = _batch(block_size, rng, host_lists)
    csr = build_paged_csr(md, block_size, torch.device("cpu"))
    assert csr.qo_indptr.dtype == csr.kv_indptr.dtype == csr.kv_indices.dtype == torch.int32
    assert csr.kv_last_page_len.dtype == torch.int32
    assert csr.qo_indptr.tolist() == md.query_start_loc.tolist()
    assert csr.num_tokens == int(md.query_start_loc[-1]) and csr.num_seqs == md.num_seqs
    assert csr.max_query_len == md.max_query_len
    indptr, indices = csr.kv_indptr.tolist(), csr.kv_indices.tolist()
    assert indptr[-1] == len(indices)
    for b, want in enumerate(slots):
        pages = indices[indptr[b] : indptr[b + 1]]
        last = int(csr.kv_last_page_len[b])
        # FlashInfer's length rule: (pages - 1) * page_size + last_page_len, 0 with no pages
        length = (len(pages) - 1) * block_size + last if pages else last
        assert length == len(want)
        if pages:
            assert 1 <= last <= block_size
        got = [pages[p // block_size] * block_size + p % block_size for p in range(len(want))]
        assert got == want


def test_empty_sequences_and_empty_batch() -> None:
    md = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        query_start_loc=torch.zeros(1, dtype=torch.int64),
        seq_lens=torch.zeros(0, dtype=torch.int64),
        block_tables=torch.zeros(0, 1, dtype=torch.int64),
        max_query_len=0,
        max_seq_len=0,
    )
    csr = build_paged_csr(md, 16, torch.device("cpu"))
    assert csr.kv_indptr.tolist() == [0] and csr.kv_indices.numel() == 0 and csr.num_seqs == 0
    md = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.int64),
        query_start_loc=torch.tensor([0, 0, 1]),
        seq_lens=torch.tensor([0, 3]),
        block_tables=torch.tensor([[0], [7]]),
        max_query_len=1,
        max_seq_len=3,
        query_lens_cpu=[0, 1],
        seq_lens_cpu=[0, 3],
    )
    csr = build_paged_csr(md, 16, torch.device("cpu"))
    assert csr.kv_indptr.tolist() == [0, 0, 1]
    assert csr.kv_indices.tolist() == [7]
    assert csr.kv_last_page_len.tolist() == [0, 3]


def test_too_narrow_block_table_is_refused() -> None:
    md = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.int64),
        query_start_loc=torch.tensor([0, 1]),
        seq_lens=torch.tensor([17]),
        block_tables=torch.tensor([[3]]),
        max_query_len=1,
        max_seq_len=17,
        query_lens_cpu=[1],
        seq_lens_cpu=[17],
    )
    with pytest.raises(ValueError, match="needs 2 blocks of 16, but block_tables has 1 columns"):
        build_paged_csr(md, 16, torch.device("cpu"))


def test_forward_context_builds_the_page_lists_once_before_the_layers() -> None:
    pytest.importorskip("triton")  # the flashinfer backend writes K/V with Triton's kernel
    from outrider.kernels.attention.flashinfer_attn import BACKEND, STATE_KEY

    md, _ = _batch(16, random.Random(3))
    caches = [(torch.zeros(400, 16, 2, 64), torch.zeros(400, 16, 2, 64)) for _ in range(2)]
    with forward_context(ForwardContext(md, caches, BACKEND)):
        csr = md.backend_state[STATE_KEY]
        assert csr.page_size == 16 and csr.num_seqs == md.num_seqs
        # a layer asking again gets the same object: one translation per forward
        assert BACKEND._page_lists(md, caches[1][0]) is csr
