"""Incremental detokenization and stop conditions, applied token by token.

Accepted blocks from a speculative round arrive several tokens at a time; EOS, stop token ids,
stop strings, ``max_tokens`` and ``max_model_len`` may each cut inside such a block, and the tokens
after the cut are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from outrider.cluster.sequence import SeqStatus, Sequence


class Detokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        eos_token_ids: Iterable[int],
        max_model_len: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def _decode_next(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        ids = seq.token_ids
        prefix = self.tokenizer.decode(
            ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True
        )
        full = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return full[len(prefix) :]
        return ""

    def append(self, seq: Sequence, new_token_ids: Iterable[int]) -> int:
        """Append tokens until one finishes the sequence; return how many were kept."""
        kept = 0
        params = seq.params
        for tok in new_token_ids:
            seq.token_ids.append(tok)
            kept += 1
            seq.text += self._decode_next(seq)
            if not params.ignore_eos and tok in self.eos_token_ids:
                self._finish(seq, "stop")
            elif tok in params.stop_token_ids:
                self._finish(seq, "stop")
            elif params.stop and self._cut_stop_string(seq):
                self._finish(seq, "stop")
            elif seq.num_output_tokens >= params.max_tokens:
                self._finish(seq, "length")
            elif len(seq.token_ids) >= self.max_model_len:
                self._finish(seq, "length")
            if seq.is_finished:
                break
        return kept

    def _cut_stop_string(self, seq: Sequence) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, seq.stop_checked_len - longest + 1)
        hits = [i for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
        seq.stop_checked_len = len(seq.text)
        if not hits:
            return False
        # NOTE: stop strings are excluded from the returned text.
        seq.text = seq.text[: min(hits)]
        seq.prefix_offset = seq.read_offset = len(seq.token_ids)
        return True

    def flush(self, seq: Sequence) -> None:
        """Emit text held back for an incomplete UTF-8 sequence once the request ends."""
        if self.tokenizer is None:
            return
        tail = self.tokenizer.decode(seq.token_ids[seq.prefix_offset :], skip_special_tokens=True)
        head = self.tokenizer.decode(
            seq.token_ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True
        )
        if len(tail) > len(head):
            seq.text += tail[len(head) :]
            seq.read_offset = len(seq.token_ids)

    @staticmethod
    def _finish(seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
