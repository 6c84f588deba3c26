"""Training objectives: one forward + loss per method on a captured TargetBatch.

Alignment (target position p's logits predict token p+1; hidden index i is target position i):
- EAGLE-3 (training-time test): step s, row i feeds token x[i+1+s] at position i+s with the
  fused hidden (s = 0) or the step s-1 output; it is scored against the target at i+1+s.
- P-EAGLE: element (i, d) feeds x[i+1] and fc(aux[i]) at depth 0, the mask token and
  fc(mask_hidden) at d > 0, at position i+d; scored against the target at i+1+d. All depths in
  one pass, as served.
- DFlash: an anchor a (a >= 1) feeds [x[a], mask × (B-1)] at positions a..a+B-1 over context
  features at positions < a; slot k >= 1 is scored against the target at a+k-1.
The loss is KL(target || draft) over the draft vocabulary; `hits` counts rows whose draft
argmax (in target ids) equals the target's full-vocabulary argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from outrider.train.capture import TargetBatch
from outrider.train.modules import (
    DFlashDrafter,
    EagleDrafter,
    block_mask,
    chain_mask,
    parallel_chain_mask,
)


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, differentiable
    kl: list[float]  # per draft position
    accuracy: list[float]  # per position: draft argmax == target argmax, given earlier ones were
    rows: list[int]  # scored rows per position

    @property
    def acceptance_length(self) -> float:
        """1 + sum of chained accuracies: the greedy acceptance length these rows imply."""
        return 1.0 + sum(self.accuracy)


def _kl_rows(
    draft_logits: torch.Tensor,  # [R, Vd]
    target_logits: torch.Tensor,  # [R, Vd]
) -> torch.Tensor:
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [R]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] at positions idx [B, N] clamped into range -> [B, N, ...]."""
    t = x.shape[1]
    idx = idx.clamp(0, t - 1)
    if x.dim() == 2:
        return torch.gather(x, 1, idx)
    return torch.gather(x, 1, idx[..., None].expand(*idx.shape, x.shape[-1]))


class _Scorer:
    """Accumulates KL and chained accuracy over draft positions."""

    def __init__(self, kept: torch.Tensor, weights: list[float]) -> None:
        self.kept = kept
        self.weights = weights
        self.losses: list[torch.Tensor] = []
        self.kl: list[float] = []
        self.rows: list[int] = []
        self.correct: list[torch.Tensor] = []  # per position [B, N] bool (chained)

    def add(
        self,
        logits: torch.Tensor,  # [B, N, Vd]
        target_logits: torch.Tensor,  # [B, N, Vd]
        target_argmax: torch.Tensor,  # [B, N]
        valid: torch.Tensor,  # [B, N] bool
    ) -> None:
        pos = len(self.losses)
        kl = _kl_rows(logits[valid], target_logits[valid])  # [R]
        rows = int(kl.numel())
        mean = kl.mean() if rows else logits.sum() * 0.0
        self.losses.append(mean * self.weights[pos])
        self.kl.append(float(mean.detach()) if rows else 0.0)
        self.rows.append(rows)
        hit = (self.kept[logits.detach().argmax(dim=-1)] == target_argmax) & valid
        if self.correct:
            hit = hit & self.correct[-1]
        self.correct.append(hit)

    def result(self, first_valid: torch.Tensor) -> StepResult:
        """Chained accuracy over the rows valid at position 0 (``first_valid`` [B, N])."""
        base = max(int(first_valid.sum()), 1)
        acc = [float((c & first_valid).sum()) / base for c in self.correct]
        loss = torch.stack(self.losses).sum() / sum(self.weights[: len(self.losses)])
        return StepResult(loss, self.kl, acc, self.rows)


def eagle3_step(
    model: EagleDrafter,
    batch: TargetBatch,
    kept: torch.Tensor,
    num_steps: int,
    decay: float,
) -> StepResult:
    b, t = batch.input_ids.shape
    dev = batch.input_ids.device
    i = torch.arange(t, device=dev).expand(b, t)  # [B, T]
    length = batch.lengths[:, None]
    scorer = _Scorer(kept, [decay**s for s in range(num_steps)])
    hidden = model.fuse(batch.aux)  # [B, T, H]
    past: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in model.layers]
    first_valid = (i + 1) <= length - 1
    for s in range(num_steps):
        tgt = i + 1 + s
        valid = tgt <= length - 1  # [B, T]
        ids = torch.where(valid, _gather(batch.input_ids, tgt), 0)
        mask = chain_mask(t, s, dev)[None]
        logits, hidden, kvs = model.step(ids, hidden, i + s, mask, past)
        for layer_past, kv in zip(past, kvs, strict=True):
            layer_past.append(kv)
        scorer.add(
            logits,
            _gather(batch.target_logits, tgt),
            _gather(batch.target_argmax, tgt),
            valid,
        )
    return scorer.result(first_valid)


def peagle_step(
    model: EagleDrafter,
    batch: TargetBatch,
    kept: torch.Tensor,
    num_depths: int,
    mask_token_id: int,
    decay: float,
) -> StepResult:
    assert model.mask_hidden is not None
    b, t = batch.input_ids.shape
    dev = batch.input_ids.device
    i = torch.arange(t, device=dev).expand(b, t)
    length = batch.lengths[:, None]
    fused = model.fuse(batch.aux)  # [B, T, H]
    mask_fused = model.fuse(model.mask_hidden)  # [1, 1, H]
    ids0 = torch.where(i + 1 <= length - 1, _gather(batch.input_ids, i + 1), 0)
    ids = torch.cat([ids0] + [torch.full_like(ids0, mask_token_id)] * (num_depths - 1), dim=1)
    hidden = torch.cat([fused] + [mask_fused.expand(b, t, -1)] * (num_depths - 1), dim=1)
    positions = torch.cat([i + d for d in range(num_depths)], dim=1)  # [B, D·T]
    mask = parallel_chain_mask(t, num_depths, dev)[None]
    logits, _, _ = model.step(ids, hidden, positions, mask)  # [B, D·T, Vd]
    scorer = _Scorer(kept, [decay**d for d in range(num_depths)])
    for d in range(num_depths):
        tgt = i + 1 + d
        scorer.add(
            logits[:, d * t : (d + 1) * t],
            _gather(batch.target_logits, tgt),
            _gather(batch.target_argmax, tgt),
            tgt <= length - 1,
        )
    return scorer.result(i + 1 <= length - 1)


def sample_anchors(lengths: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """[B, n] anchors uniform in [1, len-1] per sequence (with replacement)."""
    hi = (lengths - 1).clamp(min=1).to(torch.float64)  # number of choices
    u = torch.rand(lengths.shape[0], n, generator=generator, dtype=torch.float64)
    return (1 + (u * hi.cpu()[:, None]).floor().to(torch.int64)).to(lengths.device)


def dflash_step(
    model: DFlashDrafter,
    batch: TargetBatch,
    kept: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    anchors: torch.Tensor,  # [B, n]
    causal: bool,
    decay: float,
) -> StepResult:
    b, t = batch.input_ids.shape
    n = anchors.shape[1]
    dev = batch.input_ids.device
    slot = torch.arange(block_size, device=dev)
    positions = (anchors[:, :, None] + slot).reshape(b, n * block_size)  # [B, n·bs]
    anchor_ids = _gather(batch.input_ids, anchors)  # [B, n]
    ids = torch.full((b, n, block_size), mask_token_id, dtype=torch.int64, device=dev)
    ids[:, :, 0] = anchor_ids
    mask = block_mask(anchors, t, block_size, causal)
    logits = model(batch.aux, ids.reshape(b, -1), positions, mask).view(b, n, block_size, -1)
    length = batch.lengths[:, None]
    scorer = _Scorer(kept, [decay ** (k - 1) for k in range(1, block_size)])
    for k in range(1, block_size):
        tgt = anchors + k - 1  # [B, n]
        scorer.add(
            logits[:, :, k],
            _gather(batch.target_logits, tgt),
            _gather(batch.target_argmax, tgt),
            tgt <= length - 1,
        )
    return scorer.result(anchors <= length - 1)
