"""Outrider's block tables as CSR page lists (FlashInfer's paged-KV description).

Outrider's cache is one ``[num_blocks, block_size, nKV, hd]`` tensor for keys and one for values
per layer, and a sequence's blocks are the first ``ceil(seq_len / block_size)`` entries of its
row of ``block_tables``. That is FlashInfer's "NHD" paged layout given as a ``(k_cache, v_cache)``
tuple, so the cache is read in place; only the page table changes form:

* ``kv_indptr [B + 1]``: sequence b owns pages ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``;
* ``kv_indices [P]``: the block ids, in order, of every sequence (P = total pages);
* ``kv_last_page_len [B]``: tokens in each sequence's last page (0 for an empty sequence).

The lengths come from the metadata's host copies, so nothing here waits on the device; the
block ids are gathered on the device from ``block_tables``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from outrider.kernels.attention.metadata import AttentionMetadata


@dataclass
class PagedCSR:
    qo_indptr: torch.Tensor  # [B + 1] int32, host
    kv_indptr: torch.Tensor  # [B + 1] int32, host
    kv_indices: torch.Tensor  # [P] int32, on the cache's device
    kv_last_page_len: torch.Tensor  # [B] int32, host
    page_size: int
    num_tokens: int  # T, total query tokens
    max_query_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.kv_last_page_len.shape[0])


def host_lengths(md: AttentionMetadata) -> tuple[list[int], list[int]]:
    """(query_lens, seq_lens) as host lists; reads the device only when no host copy was kept."""
    q_lens = list(md.query_lens_cpu)
    if not q_lens and md.num_seqs:
        starts = md.query_start_loc.tolist()
        q_lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    seq_lens = list(md.seq_lens_cpu) if md.seq_lens_cpu else md.seq_lens.tolist()
    return q_lens, seq_lens


def build_paged_csr(md: AttentionMetadata, page_size: int, device: torch.device) -> PagedCSR:
    q_lens, seq_lens = host_lengths(md)
    b = len(seq_lens)
    pages = [-(-s // page_size) for s in seq_lens]
    width = int(md.block_tables.shape[1]) if md.block_tables.dim() == 2 else 0
    if b and max(pages) > width:
        raise ValueError(
            f"a sequence of {max(seq_lens)} tokens needs {max(pages)} blocks of {page_size}, "
            f"but block_tables has {width} columns"
        )
    qo_indptr = torch.zeros(b + 1, dtype=torch.int32)
    kv_indptr = torch.zeros(b + 1, dtype=torch.int32)
    if b:
        qo_indptr[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
        kv_indptr[1:] = torch.tensor(pages, dtype=torch.int32).cumsum(0)
    last = [s - (p - 1) * page_size if p else 0 for s, p in zip(seq_lens, pages, strict=True)]
    total = int(kv_indptr[-1])
    if total:
        tables = md.block_tables.to(device)  # [B, W]
        counts = torch.tensor(pages, dtype=torch.int64).to(device, non_blocking=True)  # [B]
        first = kv_indptr[:-1].to(device=device, dtype=torch.int64, non_blocking=True)  # [B]
        seq_of_page = torch.repeat_interleave(
            torch.arange(b, device=device), counts, output_size=total
        )  # [P]
        page_in_seq = torch.arange(total, device=device) - first[seq_of_page]  # [P]
        kv_indices = tables[seq_of_page, page_in_seq].to(torch.int32)  # [P]
    else:
        kv_indices = torch.zeros(0, dtype=torch.int32, device=device)
    return PagedCSR(
        qo_indptr=qo_indptr,
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
        kv_last_page_len=torch.tensor(last, dtype=torch.int32),
        page_size=page_size,
        num_tokens=int(qo_indptr[-1]),
        max_query_len=max(q_lens, default=0),
    )
