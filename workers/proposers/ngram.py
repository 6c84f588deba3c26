"""N-gram (prompt lookup) drafting: copy what followed the latest earlier match of the suffix.

For n from ``prompt_lookup_max`` down to ``prompt_lookup_min``, the last n tokens are searched
for earlier in the sequence; the tokens after the most recent earlier occurrence become the
drafts. No model runs, so all k drafts come at once (parallel); the sequential mode looks up one
token at a time on the growing context, which is what a one-token drafter would do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from outrider.workers.proposers.base import (
    DrafterCapabilities,
    DraftMode,
    ProposeItem,
    Proposer,
    ProposeResult,
)
from outrider.workers.spec_config import SpeculativeConfig


def ngram_lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Drafts for the sequence ``tokens`` [L]: up to k tokens, possibly fewer or none."""
    length = tokens.shape[0]
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n :]
        windows = sliding_window_view(tokens[: length - 1], n)  # [L - n, n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer(Proposer):
    method = "ngram"

    def __init__(self, spec: SpeculativeConfig) -> None:
        self.n_min = spec.lookup_min
        self.n_max = spec.lookup_max
        self.k = spec.num_speculative_tokens or 1
        self._tokens: dict[int, list[int]] = {}

    @property
    def capabilities(self) -> DrafterCapabilities:
        return DrafterCapabilities(method=self.method, parallel_drafting=True, max_k=32)

    def _ingest(self, item: ProposeItem) -> list[int]:
        d = item.delta
        toks = self._tokens.setdefault(d.seq_id, [])
        if d.start_pos > len(toks):
            raise ValueError(
                f"sequence {d.seq_id}: delta starts at {d.start_pos} but {len(toks)} are known"
            )
        del toks[d.start_pos :]
        toks.extend(d.token_ids)
        return toks

    def propose(self, items: Sequence[ProposeItem], mode: DraftMode) -> ProposeResult:
        drafts: list[list[int]] = []
        for item in items:
            toks = self._ingest(item)
            if item.num_draft == 0:
                drafts.append([])
                continue
            if mode == "parallel":
                drafts.append(
                    ngram_lookup(np.asarray(toks), self.n_min, self.n_max, item.num_draft)
                )
                continue
            ctx = list(toks)
            out: list[int] = []
            for _ in range(item.num_draft):
                nxt = ngram_lookup(np.asarray(ctx), self.n_min, self.n_max, 1)
                if not nxt:
                    break
                out.append(nxt[0])
                ctx.append(nxt[0])
            drafts.append(out)
        return ProposeResult(drafts, [None] * len(items))

    def release(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self._tokens.pop(seq_id, None)

    def kv_usage(self) -> dict[str, int]:
        return {}
