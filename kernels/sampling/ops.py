"""Shared sampling math: per-request parameters, top-k/top-p masks, probabilities, random draws.

Every sampling backend uses these, so the torch reference and the GPU kernels agree on what a
request's distribution is and on which random numbers each request consumes. A request with a
``torch.Generator`` draws its numbers from it alone, row by row, so its tokens do not depend on
the rest of the batch; the other rows share one batched draw from the global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# NOTE: a temperature below this is greedy (vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class SamplingTensors:
    """Per-request sampling parameters of a batch, as device tensors plus host-side flags."""

    temperature: torch.Tensor  # [B] float; < GREEDY_EPS means greedy
    top_k: torch.Tensor  # [B] int64; <= 0 or >= V disables
    top_p: torch.Tensor  # [B] float; >= 1 disables
    generators: list[torch.Generator | None]  # per request; None draws from the global RNG
    all_greedy: bool
    all_random: bool
    no_top_k: bool = False  # host-known: no row restricts top-k, so the sort can be skipped
    no_top_p: bool = False  # host-known: no row restricts top-p

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @classmethod
    def from_lists(
        cls,
        temperatures: Sequence[float],
        top_ks: Sequence[int] | None = None,
        top_ps: Sequence[float] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
    ) -> SamplingTensors:
        b = len(temperatures)
        ks = [-1] * b if top_ks is None else [int(k) for k in top_ks]
        ps = [1.0] * b if top_ps is None else [float(p) for p in top_ps]
        gens = [None] * b if generators is None else list(generators)
        if not (len(ks) == len(ps) == len(gens) == b):
            raise ValueError(
                f"sampling parameter lists differ in length: temperatures {b}, top_k {len(ks)}, "
                f"top_p {len(ps)}, generators {len(gens)}"
            )
        greedy = [float(t) < GREEDY_EPS for t in temperatures]
        return cls(
            temperature=torch.tensor(
                [float(t) for t in temperatures], dtype=torch.float32, device=device
            ),
            top_k=torch.tensor(ks, dtype=torch.int64, device=device),
            top_p=torch.tensor(ps, dtype=torch.float32, device=device),
            generators=gens,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_top_k=all(k <= 0 or (vocab_size is not None and k >= vocab_size) for k in ks),
            no_top_p=all(p >= 1.0 for p in ps),
        )


def apply_top_k_top_p(
    logits: torch.Tensor,  # [N, V]
    top_k: torch.Tensor | None,  # [N] int; <= 0 or >= V disables; None disables for all rows
    top_p: torch.Tensor | None,  # [N] float; >= 1 disables; None disables for all rows
) -> torch.Tensor:
    """Set logits outside each row's kept set to -inf; the kept set is chosen by value.

    Top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are all
    kept). Top-p then works on the softmax of the top-k survivors: a token is kept when the mass
    of the tokens strictly more probable than it is < top_p, so tied tokens are kept or dropped
    together. The most probable token is always kept.
    """
    if top_k is None and top_p is None:
        return logits
    v = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1, descending=True).values  # [N, V]
    rank = torch.arange(v, device=logits.device)  # [V]
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)  # [N, V] a prefix of sorted order
    if top_k is not None:
        k = torch.where((top_k <= 0) | (top_k >= v), v, top_k).to(torch.int64)  # [N]
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # [N, 1]
        keep = sorted_logits >= kth
    if top_p is not None:
        dtype = compute_dtype(logits)
        probs = sorted_logits.to(dtype).masked_fill(~keep, float("-inf")).softmax(-1)  # [N, V]
        cum = probs.cumsum(-1)  # [N, V]
        # NOTE: the exclusive cumsum is built by shifting, never as cum - probs, so it stays
        # monotone and the kept set stays a prefix of the sorted order.
        mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # [N, V]
        p = top_p.to(dtype)[:, None]  # [N, 1]
        keep = keep & ((mass_before < p) | (p >= 1.0))
    keep = keep | (rank == 0)[None, :]
    num_keep = keep.sum(-1)  # [N]
    threshold = sorted_logits.gather(1, (num_keep - 1)[:, None])  # [N, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _flatten_rows(
    logits: torch.Tensor,  # [N, V] or [B, S, V]
    *params: torch.Tensor | None,  # each [N] or [B]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    if logits.dim() == 2:
        return logits, list(params)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, V] or [B, S, V], got shape {tuple(logits.shape)}")
    s = logits.shape[1]
    flat = [None if t is None else t.repeat_interleave(s) for t in params]
    return logits.reshape(-1, logits.shape[-1]), flat


def compute_probs(
    logits: torch.Tensor,  # [N, V] or [B, S, V]
    temperature: torch.Tensor,  # [N] or [B]
    top_k: torch.Tensor | None = None,  # [N] or [B]
    top_p: torch.Tensor | None = None,  # [N] or [B]
) -> torch.Tensor:
    """softmax(apply_top_k_top_p(logits / temperature)); greedy rows are one-hot at the argmax.

    With ``[B, S, V]`` logits the per-request parameters ``[B]`` apply to all S positions.
    Returns float32 probabilities (float64 for float64 logits) shaped like ``logits``.
    """
    shape = logits.shape
    flat, (temp, k, p) = _flatten_rows(logits, temperature, top_k, top_p)
    assert temp is not None
    x = flat.to(compute_dtype(flat))  # [N, V]
    greedy = temp < GREEDY_EPS  # [N]
    scale = torch.where(greedy, torch.ones_like(temp), temp).to(x.dtype)  # [N]
    probs = apply_top_k_top_p(x / scale[:, None], k, p).softmax(-1)  # [N, V]
    one_hot = torch.zeros_like(probs).scatter_(1, flat.argmax(-1, keepdim=True), 1.0)  # [N, V]
    return torch.where(greedy[:, None], one_hot, probs).reshape(shape)


def _draw(
    shape_per_row: tuple[int, ...],
    generators: Sequence[torch.Generator | None],
    device: torch.device | str,
    dtype: torch.dtype,
    exponential: bool,
) -> torch.Tensor:
    def fill(t: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        return t.exponential_(generator=gen) if exponential else t.uniform_(generator=gen)

    b = len(generators)
    out = torch.empty((b, *shape_per_row), device=device, dtype=dtype)  # [B, ...]
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if not seeded:
        return fill(out, None)
    if len(seeded) < b:
        rows = [i for i, g in enumerate(generators) if g is None]
        shared = torch.empty((len(rows), *shape_per_row), device=device, dtype=dtype)
        out[torch.tensor(rows, device=device)] = fill(shared, None)
    for i in seeded:
        fill(out[i], generators[i])
    return out


def draw_uniform(
    shape_per_row: tuple[int, ...],
    generators: Sequence[torch.Generator | None],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """U[0, 1) numbers shaped ``[B, *shape_per_row]``; row b from generators[b] when given."""
    return _draw(tuple(shape_per_row), generators, device, dtype, exponential=False)


def draw_exponential(
    shape_per_row: tuple[int, ...],
    generators: Sequence[torch.Generator | None],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Exp(1) numbers shaped ``[B, *shape_per_row]``; row b from generators[b] when given."""
    return _draw(tuple(shape_per_row), generators, device, dtype, exponential=True)


def draw_rejection_randoms(
    num_draft_tokens: Sequence[int],
    max_k: int,
    vocab_size: int,
    generators: Sequence[torch.Generator | None],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random inputs of ``rejection_sample``: (uniforms [B, K], recovered_noise [B, V]).

    A seeded row draws its own num_draft_tokens[b] uniforms, then V exponentials, so what it
    consumes depends on that request alone, not on K or the batch (its padding is 1.0). One
    noise row per request suffices: only the first rejected position's recovered token is used.
    """
    b = len(generators)
    uniforms = torch.ones((b, max_k), device=device, dtype=dtype)  # [B, K]
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded and max_k > 0:
        shared = draw_uniform((max_k,), [None] * len(unseeded), device, dtype)
        if len(unseeded) == b:
            uniforms = shared
        else:
            uniforms[torch.tensor(unseeded, device=device)] = shared
    noise = torch.empty((b, vocab_size), device=device, dtype=dtype)  # [B, V]
    if unseeded:
        shared = draw_exponential((vocab_size,), [None] * len(unseeded), device, dtype)
        if len(unseeded) == b:
            noise = shared
        else:
            noise[torch.tensor(unseeded, device=device)] = shared
    for i, g in enumerate(generators):
        if g is not None:
            uniforms[i, : int(num_draft_tokens[i])].uniform_(generator=g)
            noise[i].exponential_(generator=g)
    return uniforms, noise


def exponential_race(
    weights: torch.Tensor,  # [..., V] non-negative, need not be normalised
    noise: torch.Tensor,  # [..., V] Exp(1)
) -> torch.Tensor:
    """argmax(weights / noise): a draw from weights / sum(weights) (Gumbel-max equivalent).

    Tokens with zero weight never win (0 / 0 would be NaN, which argmax would pick).
    """
    score = torch.where(weights > 0, weights / noise, -1.0)  # [..., V]
    return score.argmax(-1)
