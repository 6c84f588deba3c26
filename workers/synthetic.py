"""Synthetic acceptance for benchmarks: drafts are accepted at set rates, not by comparison.

The meaning follows vLLM's ``rejection_sample_method: synthetic``: ``rates[i]`` is the
*unconditional* probability that the first i + 1 drafts are all accepted (non-increasing, in
[0, 1], one per draft position). Draft i is therefore accepted with the conditional
probability ``rates[i] / rates[i - 1]`` once draft i - 1 was. A mean acceptance length L
(which counts the target's own token, so L is in [1, k + 1]) resolves to the minimum-variance
schedule: the first floor(L - 1) positions always accepted, the next with the fraction left.

The emitted tokens are the accepted drafts followed by the target's own token at the first
rejected position (or the bonus token), so the text is not the model's output: this exists only
to measure the serving system at a fixed acceptance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# NOTE: synthetic draws use their own per-request stream, apart from the target's sampling.
_SYNTHETIC_SEED_SALT = 0x5851F42D4C957F2D


def rates_from_length(length: float, num_speculative_tokens: int) -> tuple[float, ...]:
    """Unconditional per-position rates whose mean acceptance length is ``length``."""
    accepted = length - 1.0  # expected accepted drafts
    full = min(int(math.floor(accepted)), num_speculative_tokens)
    rates = [1.0] * full
    if full < num_speculative_tokens:
        rates.append(accepted - full)
    rates += [0.0] * (num_speculative_tokens - len(rates))
    return tuple(rates)


def check_rates(rates: Sequence[float], num_speculative_tokens: int, where: str) -> None:
    """Raise ValueError naming ``where`` unless the rates are a valid schedule for k drafts."""
    shown = [float(r) for r in rates]
    if len(shown) != num_speculative_tokens:
        raise ValueError(
            f"`{where}` must have num_speculative_tokens ({num_speculative_tokens}) entries, "
            f"got {len(shown)}: {shown}"
        )
    bad = [r for r in shown if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"`{where}` entries must be in [0, 1], got {bad[0]}")
    for i in range(1, len(shown)):
        if shown[i] > shown[i - 1]:
            raise ValueError(
                f"`{where}` must be non-increasing, got {shown[i - 1]} then {shown[i]} "
                f"at positions {i - 1} and {i}"
            )


def conditional_rates(rates: Sequence[float]) -> list[float]:
    """P(accept draft i | drafts 0..i-1 accepted) from unconditional rates."""
    out = []
    prev = 1.0
    for r in rates:
        out.append(r / prev if prev > 0.0 else 0.0)
        prev = r
    return out


def synthetic_generator(seq_id: int, seed: int | None) -> torch.Generator:
    """The per-request stream of acceptance draws (host side), reproducible across runs."""
    gen = torch.Generator(device="cpu")
    base = seed if seed is not None else seq_id
    gen.manual_seed((base ^ _SYNTHETIC_SEED_SALT) % 2**64)
    return gen


def draw_synthetic_uniforms(
    num_draft_tokens: Sequence[int], max_k: int, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """[B, K] U[0, 1); row b draws num_draft_tokens[b] numbers from its own generator."""
    u = torch.ones((len(generators), max_k), dtype=torch.float64)  # [B, K] padding never accepts
    for b, gen in enumerate(generators):
        n = int(num_draft_tokens[b])
        if n:
            u[b, :n].uniform_(generator=gen)
    return u


def synthetic_accept(
    draft_token_ids: torch.Tensor,  # [B, K] int64, padded with -1
    num_draft_tokens: torch.Tensor,  # [B] int
    target_token_ids: torch.Tensor,  # [B, K+1] the target's own token at each position
    uniforms: torch.Tensor,  # [B, K] U[0, 1)
    cond_rates: Sequence[float],  # [>= K] conditional acceptance per position
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept drafts at the set rates; returns (output [B, K+1], num_accepted [B]).

    Row b holds its accepted drafts, then the target's token at the first rejected position (or
    the bonus token at n_b), then -1.
    """
    b, k = draft_token_ids.shape
    device = draft_token_ids.device
    n = num_draft_tokens.to(device=device, dtype=torch.int64)  # [B]
    col = torch.arange(k, device=device)  # [K]
    cond = torch.tensor(list(cond_rates)[:k] + [0.0] * max(0, k - len(cond_rates)))
    cond = cond.to(device=device, dtype=torch.float64)  # [K]
    accept = (col[None, :] < n[:, None]) & (uniforms.to(device) < cond[None, :])  # [B, K]
    num_accepted = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]
    rows = torch.arange(b, device=device)
    last = target_token_ids.to(torch.int64)[rows, num_accepted]  # [B]
    padded = torch.cat(
        [draft_token_ids.to(torch.int64), torch.full((b, 1), -1, dtype=torch.int64, device=device)],
        dim=1,
    )  # [B, K+1]
    col1 = torch.arange(k + 1, device=device)  # [K+1]
    output = torch.where(col1[None, :] < num_accepted[:, None], padded, -1)
    output = output.scatter(1, num_accepted[:, None], last[:, None])  # [B, K+1]
    return output, num_accepted
