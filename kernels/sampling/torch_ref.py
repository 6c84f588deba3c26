"""Reference sampler and rejection sampler in torch: the CPU path and the oracle for GPU kernels.

Sampling draws ``argmax(probs / Exp(1))``, which is a draw from ``probs`` without normalising
or a cumulative sum. Verification follows Leviathan et al. (2211.17192) with vLLM's vocabulary:
a draft token is accepted with probability min(1, p/q); the first rejected position emits a
recovered token drawn from max(p - q, 0); a row whose drafts are all accepted emits its bonus
token. Every random number comes in as an argument, so a kernel fed the same numbers must
return the same tokens.
"""

from __future__ import annotations

import torch

from outrider.kernels.sampling.ops import (
    GREEDY_EPS,
    SamplingTensors,
    apply_top_k_top_p,
    compute_dtype,
    compute_probs,
    draw_exponential,
    draw_rejection_randoms,
    draw_uniform,
    exponential_race,
)

__all__ = [
    "BACKEND",
    "GREEDY_EPS",
    "SamplingTensors",
    "TorchSamplingBackend",
    "apply_top_k_top_p",
    "compute_probs",
    "draw_exponential",
    "draw_rejection_randoms",
    "draw_uniform",
    "probs_for",
    "rejection_sample",
    "rejection_sample_strict",
    "sample",
    "sample_from_probs",
]

PLACEHOLDER_TOKEN_ID = -1


def probs_for(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """compute_probs with the batch's parameters; logits [B, V] or [B, S, V]."""
    top_k = None if st.no_top_k else st.top_k
    top_p = None if st.no_top_p else st.top_p
    return compute_probs(logits, st.temperature, top_k, top_p)


def sample_from_probs(
    probs: torch.Tensor,  # [B, V] from compute_probs; greedy rows are one-hot
    st: SamplingTensors,
) -> torch.Tensor:
    """One token per row from precomputed probabilities (a drafter keeps probs as q)."""
    if st.all_greedy:
        return probs.argmax(-1)
    noise = draw_exponential((probs.shape[-1],), st.generators, probs.device, probs.dtype)
    drawn = exponential_race(probs, noise)  # [B]
    if st.all_random:
        return drawn
    return torch.where(st.temperature < GREEDY_EPS, probs.argmax(-1), drawn)


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Token ids [B] int64: argmax for greedy rows, a draw from the processed p for the rest."""
    greedy_ids = logits.argmax(-1)  # [B]
    if st.all_greedy:
        return greedy_ids
    probs = probs_for(logits, st)  # [B, V]
    noise = draw_exponential((probs.shape[-1],), st.generators, probs.device, probs.dtype)
    drawn = exponential_race(probs, noise)  # [B]
    if st.all_random:
        return drawn
    return torch.where(st.temperature < GREEDY_EPS, greedy_ids, drawn)


def _accepted_prefix(accept: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True per row: [B, K] bool -> [B] int64."""
    return accept.to(torch.int64).cumprod(dim=1).sum(dim=1)


def rejection_sample_strict(
    draft_token_ids: torch.Tensor,  # [B, K] int64, padded with -1
    num_draft_tokens: torch.Tensor,  # [B] int, 0..K
    target_token_ids: torch.Tensor,  # [B, K+1] int64: the target's token at each position
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept drafts while they equal the target's tokens; returns (output [B, K+1], accepted [B]).

    Row b holds num_accepted[b] + 1 tokens, then -1: the accepted drafts, then the target's token
    at the first mismatch, or target_token_ids[b, n_b] (the bonus token) if none mismatched.
    """
    b, k = draft_token_ids.shape
    device = draft_token_ids.device
    n = num_draft_tokens.to(device=device, dtype=torch.int64)  # [B]
    valid = torch.arange(k, device=device)[None, :] < n[:, None]  # [B, K]
    match = valid & (draft_token_ids == target_token_ids[:, :k])  # [B, K]
    num_accepted = _accepted_prefix(match)  # [B]
    # NOTE: accepted drafts equal the target's tokens, so the output is a prefix of the targets.
    col = torch.arange(k + 1, device=device)  # [K+1]
    output = torch.where(
        col[None, :] <= num_accepted[:, None],
        target_token_ids.to(torch.int64),
        PLACEHOLDER_TOKEN_ID,
    )  # [B, K+1]
    return output, num_accepted


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [B, K] int64, padded with -1
    num_draft_tokens: torch.Tensor,  # [B] int, 0..K
    draft_probs: torch.Tensor | None,  # [B, K, V] q; None = one-hot at the draft token
    target_probs: torch.Tensor,  # [B, K+1, V] p (or [B, K, V]; position K is never read)
    uniforms: torch.Tensor,  # [B, K] U[0, 1)
    recovered_noise: torch.Tensor,  # [B, K, V] or [B, V] (shared by all positions) Exp(1)
    bonus_token_ids: torch.Tensor,  # [B] int64, sampled from p at position n_b
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless probabilistic verification; returns (output [B, K+1], num_accepted [B]).

    Draft i is accepted when ``p(d) > 0 and uniforms[b, i] <= p(d) / q(d)``. At the first rejected
    position r the recovered token is ``argmax(max(p - q, 0) / noise)`` over tokens with positive
    weight; when no token has positive weight (p == q up to rounding) it is
    ``argmax(p / noise)``. A row with every draft accepted emits bonus_token_ids[b].
    """
    b, k = draft_token_ids.shape
    device = draft_token_ids.device
    n = num_draft_tokens.to(device=device, dtype=torch.int64)  # [B]
    bonus = bonus_token_ids.to(device=device, dtype=torch.int64)  # [B]
    if k == 0:
        return bonus[:, None].clone(), torch.zeros(b, dtype=torch.int64, device=device)
    dtype = compute_dtype(target_probs)
    valid = torch.arange(k, device=device)[None, :] < n[:, None]  # [B, K]
    drafts = torch.where(valid, draft_token_ids, 0)  # [B, K] padding made indexable
    p_draft = target_probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1).to(dtype)  # [B, K]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)  # [B, K]
    else:
        q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1).to(dtype)  # [B, K]
    # NOTE: p(d) > 0 guards u == 0 against accepting a token the target cannot emit; q(d) == 0
    # with p(d) > 0 gives an infinite ratio and is accepted.
    accept = valid & (p_draft > 0) & (uniforms.to(dtype) <= p_draft / q_draft)  # [B, K]
    num_accepted = _accepted_prefix(accept)  # [B]

    rows = torch.arange(b, device=device)  # [B]
    pos = num_accepted.clamp(max=k - 1)  # [B] first rejected position (when one exists)
    p_rej = target_probs[rows, pos].to(dtype)  # [B, V]
    if draft_probs is None:
        weights = p_rej.scatter(1, drafts[rows, pos][:, None], 0.0)  # [B, V] max(p - onehot, 0)
    else:
        weights = (p_rej - draft_probs[rows, pos].to(dtype)).clamp_min(0.0)  # [B, V]
    has_mass = (weights > 0).any(dim=-1, keepdim=True)  # [B, 1]
    weights = torch.where(has_mass, weights, p_rej)  # [B, V]
    noise = recovered_noise if recovered_noise.dim() == 2 else recovered_noise[rows, pos]
    recovered = exponential_race(weights, noise.to(dtype))  # [B]

    last = torch.where(num_accepted == n, bonus, recovered)  # [B]
    padded = torch.cat(
        [
            draft_token_ids.to(torch.int64),
            torch.full((b, 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=device),
        ],
        dim=1,
    )  # [B, K+1]
    col = torch.arange(k + 1, device=device)  # [K+1]
    output = torch.where(col[None, :] < num_accepted[:, None], padded, PLACEHOLDER_TOKEN_ID)
    output = output.scatter(1, num_accepted[:, None], last[:, None])  # [B, K+1]
    return output, num_accepted


class TorchSamplingBackend:
    """The ``torch`` sampling backend: the functions above behind the registry's interface."""

    name = "torch"
    compute_probs = staticmethod(probs_for)
    sample = staticmethod(sample)
    sample_from_probs = staticmethod(sample_from_probs)
    rejection_sample_strict = staticmethod(rejection_sample_strict)
    rejection_sample = staticmethod(rejection_sample)


BACKEND = TorchSamplingBackend()
