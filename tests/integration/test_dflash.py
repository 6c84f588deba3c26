"""DFlash drafting from speculators-format checkpoints: loading, losslessness, the block math.

Checkpoints are written the way speculators 0.9.0 / main save them (config.json + safetensors
with the §6.2 names). The drafter's mask token gets a target embedding row aligned with the
LM-head row of the target's most frequent greedy token, so drafts are often right and the
accept paths run; the block math itself is checked against a dense float64 recomputation.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen3Config

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.workers.config import (
    CacheConfig,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    SamplingParams,
    WorkerConfig,
)
from outrider.workers.proposers.base import ProposeItem
from outrider.workers.proposers.dflash import DFlashProposer, parallel_blocker
from outrider.workers.proposers.factory import resolve_speculative
from outrider.workers.protocol import Delta
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.speculators import load_speculators_config

PROMPTS = [[5, 6, 7, 8] * 2 + [5, 6], [40, 41, 42], [*range(9, 16)] * 2 + [9, 10], [70]]
MAX_TOKENS = 24
VT, H, N_HEADS, N_KV, HD = 96, 64, 4, 2, 16
MASK = 95  # NOTE: never in a prompt; its embedding row is rewritten in the target copy
FAVOURED = 81  # its target LM-head row is scaled up: greedy output dwells on it
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


# -- checkpoints --------------------------------------------------------------------------------
_LINEARS = {  # per draft layer: name -> [out, in]
    "self_attn.q_proj": (N_HEADS * HD, H),
    "self_attn.k_proj": (N_KV * HD, H),
    "self_attn.v_proj": (N_KV * HD, H),
    "self_attn.o_proj": (H, N_HEADS * HD),
    "mlp.gate_proj": (96, H),
    "mlp.up_proj": (96, H),
    "mlp.down_proj": (H, 96),
}
_NORMS = {"input_layernorm": H, "post_attention_layernorm": H, "self_attn.q_norm": HD}
_NORMS["self_attn.k_norm"] = HD


def write_dflash(
    path: Path,
    target_dir: Path,
    target_sd: dict[str, torch.Tensor],
    *,
    k: int,
    aux_ids: list[int] | None,
    draft_vocab: list[int] | None = None,  # kept target ids (sorted) when Vd < Vt
    save_shared: bool = False,  # main layout: embed_tokens (+ lm_head) saved
    non_causal: bool | None = False,  # sliding_window_non_causal; None = key absent
    mask_token_id: int | None = MASK,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write a 2-layer speculators dflash checkpoint; returns the tensors written."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    sd = {"fc.weight": rnd(H, len(aux_ids or [1, 2, 3]) * H)}
    sd |= {f"{n}.weight": 1.0 + rnd(H, scale=0.1) for n in ("hidden_norm", "norm")}
    for i in range(2):
        sd |= {f"layers.{i}.{n}.weight": rnd(*shape) for n, shape in _LINEARS.items()}
        sd |= {f"layers.{i}.{n}.weight": 1.0 + rnd(d, scale=0.1) for n, d in _NORMS.items()}
    vd = VT if draft_vocab is None else len(draft_vocab)
    if draft_vocab is not None:
        kept = torch.tensor(draft_vocab, dtype=torch.int64)
        sd["d2t"] = kept - torch.arange(vd)
        sd["t2d"] = torch.zeros(VT, dtype=torch.bool).index_fill_(0, kept, True)
        sd["lm_head.weight"] = target_sd["lm_head.weight"][kept].clone()
    if save_shared:
        sd["embed_tokens.weight"] = target_sd["model.embed_tokens.weight"].clone()
        sd.setdefault("lm_head.weight", target_sd["lm_head.weight"].clone())
    save_file({n: t.contiguous() for n, t in sd.items()}, str(path / "model.safetensors"))
    layer_cfg = Qwen3Config(
        vocab_size=VT,
        hidden_size=H,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        head_dim=HD,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        layer_types=["sliding_attention"] * 2,
    )
    method = {"proposal_type": "greedy", "speculative_tokens": k, "verifier_accept_k": 1}
    config: dict[str, Any] = {
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"": "config.DFlashSpeculatorConfig"},
        "speculators_model_type": "dflash",
        "speculators_version": "0.9.0",
        "speculators_config": {
            "algorithm": "dflash",
            "proposal_methods": [method | {"accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": str(target_dir), "architectures": ["LlamaForCausalLM"]},
        },
        "transformer_layer_config": layer_cfg.to_diff_dict(),
        "draft_vocab_size": vd,
        "block_size": k + 1,
        "target_hidden_size": None,
        "aux_hidden_state_layer_ids": aux_ids,
        "mask_token_id": mask_token_id,
        "sliding_window_non_causal": non_causal,
        "sample_from_anchor": False,
        "tie_word_embeddings": False,
        "dtype": "float64",
    }
    config = {key: v for key, v in config.items() if v is not None or key == "target_hidden_size"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return sd


def _target_cfg(path: Path) -> WorkerConfig:
    return WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"), cache=CacheConfig(block_size=4)
    )


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The target (a tiny llama with a rewritten mask row), its greedy outputs, checkpoints."""
    _, hf = tiny_model("llama")
    root = tmp_path_factory.mktemp("dflash")
    target = copy.deepcopy(hf)
    with torch.no_grad():
        target.lm_head.weight[FAVOURED] *= 2.6
    target_dir = root / "target"
    target.save_pretrained(target_dir)
    plain = LLM(OutriderConfig(target=_target_cfg(target_dir))).generate(PROMPTS, GREEDY)
    ref = [o.token_ids for o in plain]
    # NOTE: the mask row below changes nothing the target computes as long as it never sees MASK.
    assert all(MASK not in r for r in ref)
    top = Counter(t for r in ref for t in r).most_common()
    frequent = top[0][0]
    with torch.no_grad():
        row = target.lm_head.weight[frequent]
        target.model.embed_tokens.weight[MASK] = 30.0 * row / row.norm()
    target.save_pretrained(target_dir)
    sd = {n: t.detach().clone() for n, t in target.state_dict().items()}
    kept = sorted({t for t, _ in top} | {t for t in range(0, VT, 3) if t != MASK})
    write_dflash(root / "v090", target_dir, sd, k=1, aux_ids=[1, 2, 3])
    write_dflash(root / "d2t", target_dir, sd, k=3, aux_ids=[0, 2], draft_vocab=kept, seed=1)
    shared = {"save_shared": True, "non_causal": None, "seed": 2}
    write_dflash(root / "main", target_dir, sd, k=7, aux_ids=[3, 1], **shared)
    return dict(root=root, target_dir=target_dir, ref=ref, sd=sd, kept=kept, frequent=frequent)


def _spec(world: dict[str, Any], name: str, **kw: Any) -> SpeculativeConfig:
    return SpeculativeConfig(model=str(world["root"] / name), cache=CacheConfig(block_size=4), **kw)


def _proposer(path: Path, **kw: Any) -> DFlashProposer:
    spec = resolve_speculative(SpeculativeConfig(model=str(path)))
    assert spec is not None
    wcfg = WorkerConfig(model=ModelConfig(path=str(path), dtype="float64"), **kw)
    return DFlashProposer(spec, wcfg, target_vocab_size=VT, target_num_layers=4)


# -- loading ------------------------------------------------------------------------------------
# name -> (k, aux ids, causal, d2t mapping, embed_tokens saved)
LAYOUTS = {
    "v090": (1, (1, 2, 3), True, False, False),
    "d2t": (3, (0, 2), True, True, False),
    "main": (7, (1, 3), False, False, True),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_checkpoint_loading(name: str, world: dict[str, Any]) -> None:
    k, aux, causal, mapped, saved = LAYOUTS[name]
    path = world["root"] / name
    spec = resolve_speculative(SpeculativeConfig(model=str(path)))
    assert spec is not None
    assert (spec.method, spec.num_speculative_tokens, spec.parallel_drafting) == ("dflash", k, True)
    ckpt = load_speculators_config(path)
    assert (ckpt.mask_token_id, ckpt.block_size, ckpt.causal) == (MASK, k + 1, causal)
    prop = _proposer(path)
    caps = prop.capabilities
    assert caps.method == "dflash" and caps.parallel_drafting and caps.fallback_reason is None
    assert caps.needs_target_hidden_states and caps.aux_layer_ids == aux
    assert (prop.k, prop.mask_token_id, prop.causal) == (k, MASK, causal)
    model, sd = prop.model, world["sd"]
    torch.testing.assert_close(model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    logits = model.compute_logits(torch.randn(2, H, dtype=torch.float64))  # [2, Vt]
    assert logits.shape == (2, VT)
    kept = world["kept"] if mapped else list(range(VT))
    if mapped:
        assert model.draft_to_target is not None and model.draft_to_target.tolist() == kept
        outside = torch.ones(VT, dtype=torch.bool).index_fill_(0, torch.tensor(kept), False)
        assert bool(torch.isinf(logits[:, outside]).all())
    else:
        assert model.draft_to_target is None
    assert bool(torch.isfinite(logits[:, kept]).all())
    torch.testing.assert_close(model.lm_head.weight, sd["lm_head.weight"][kept])
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert saved == ("embed_tokens.weight" in f.keys())


@pytest.mark.parametrize("key", ["aux_hidden_state_layer_ids", "mask_token_id"])
def test_required_keys(key: str, world: dict[str, Any], tmp_path: Path) -> None:
    kw: dict[str, Any] = {"aux_ids": [1, 2, 3]}
    if key == "aux_hidden_state_layer_ids":
        kw["aux_ids"] = None
    else:
        kw["mask_token_id"] = None
    write_dflash(tmp_path, world["target_dir"], world["sd"], k=3, **kw)
    with pytest.raises(ConfigError, match=key):
        load_speculators_config(tmp_path)
    with pytest.raises(ConfigError, match=key):
        resolve_speculative(SpeculativeConfig(model=str(tmp_path)))


def test_target_tensors_needed(world: dict[str, Any], tmp_path: Path) -> None:
    """A 0.9.0 checkpoint needs the target's embed/lm_head: a remote verifier id cannot serve."""
    write_dflash(tmp_path, world["target_dir"], world["sd"], k=3, aux_ids=[1, 2, 3])
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["speculators_config"]["verifier"]["name_or_path"] = "Qwen/Qwen3-8B"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = resolve_speculative(SpeculativeConfig(model=str(tmp_path)))
    assert spec is not None
    wcfg = WorkerConfig(model=ModelConfig(path=str(tmp_path), dtype="float64"))
    with pytest.raises(ValueError, match="embed_tokens.weight"):
        DFlashProposer(spec, wcfg, target_vocab_size=VT, target_num_layers=4)
    target = ModelConfig(path=str(world["target_dir"]))
    prop = DFlashProposer(
        spec, wcfg, target_vocab_size=VT, target_num_layers=4, target_model=target
    )
    torch.testing.assert_close(prop.model.lm_head.weight, world["sd"]["lm_head.weight"])
    with pytest.raises(ConfigError, match="vocab"):
        DFlashProposer(spec, wcfg, target_vocab_size=VT + 1, target_num_layers=4)
    with pytest.raises(ConfigError, match="parallel_drafting"):
        resolve_speculative(SpeculativeConfig(model=str(tmp_path), parallel_drafting=False))


def _fake_runner(pp: int, non_causal: bool) -> Any:
    backend = SimpleNamespace(supports_non_causal=non_causal)
    parallel = SimpleNamespace(pipeline_parallel_size=pp)
    return SimpleNamespace(cfg=SimpleNamespace(parallel=parallel), attn_backend=backend)


def test_sequential_fallback(world: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    assert parallel_blocker(_fake_runner(1, True), causal=False) is None
    assert parallel_blocker(_fake_runner(2, True), causal=False) == "pipeline_parallel"
    assert parallel_blocker(_fake_runner(1, False), causal=False) == "attention_backend"
    assert parallel_blocker(_fake_runner(1, False), causal=True) is None
    with caplog.at_level(logging.WARNING):
        prop = _proposer(world["root"] / "main", parallel=ParallelConfig(pipeline_parallel_size=2))
    caps = prop.capabilities
    assert not caps.parallel_drafting and caps.fallback_reason == "pipeline_parallel"
    assert sum("pipeline_parallel" in r.getMessage() for r in caplog.records) == 1


# -- losslessness -------------------------------------------------------------------------------
def _llm(world: dict[str, Any], name: str, mode: str) -> tuple[LLM, dict[str, int]]:
    """An LLM drafting in ``mode``, and block-forward counts (done vs one/k per propose)."""
    target = _target_cfg(world["target_dir"])
    llm = LLM(OutriderConfig(target=target, speculative=_spec(world, name)))
    llm.engine.mode = mode  # type: ignore[assignment]
    drafter = llm.drafter
    assert isinstance(drafter, DFlashProposer)
    counts = {"forwards": 0, "expected": 0}
    runner_forward, propose = drafter.runner.forward, drafter.propose

    def forward(*a: Any, **kw: Any) -> Any:
        counts["forwards"] += 1
        return runner_forward(*a, **kw)

    def counted_propose(items: Any, mode: Any) -> Any:
        ks = [it.num_draft for it in items]
        counts["expected"] += (1 if any(ks) else 0) if mode == "parallel" else max(ks, default=0)
        return propose(items, mode)

    drafter.runner.forward = forward  # type: ignore[method-assign]
    drafter.propose = counted_propose  # type: ignore[method-assign]
    return llm, counts


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("name", ["v090", "d2t", "main"])  # k = 1, 3, 7
def test_lossless_greedy(name: str, mode: str, world: dict[str, Any]) -> None:
    llm, counts = _llm(world, name, mode)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == world["ref"]
    stats = llm.engine.stats.spec
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    if name == "v090":
        assert stats.acceptance_rate is not None and stats.acceptance_rate > 0.3
    assert counts["forwards"] == counts["expected"] > 0
    assert llm.drafter is not None and llm.drafter.kv_usage()["num_used_blocks"] == 0


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_cuts_inside_accepted_block(mode: str, world: dict[str, Any]) -> None:
    ref, stop = world["ref"], world["frequent"]
    llm, _ = _llm(world, "main", mode)
    lengths = (3, 10, 13, 5)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [r[:n] for r, n in zip(ref, lengths, strict=True)]
    assert all(o.finish_reason == "length" for o in outs)
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop], ignore_eos=True)
        for _ in PROMPTS
    ]
    outs = llm.generate(PROMPTS, params)
    want = [r[: r.index(stop) + 1] if stop in r else r for r in ref]
    assert [o.token_ids for o in outs] == want
    # NOTE: more tokens were accepted than emitted: the stop token cut an accepted block.
    assert any(
        o.finish_reason == "stop"
        and 1 + o.spec.num_drafts + o.spec.num_accepted_tokens > len(o.token_ids)
        for o in outs
    )
    assert llm.drafter is not None and llm.drafter.kv_usage()["num_used_blocks"] == 0


# -- the block math against a dense recomputation -----------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.to(torch.float32)  # NOTE: outrider normalises in float32 (HF semantics)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, HD, 2).to(torch.float32) / HD))
    f = pos.to(torch.float32)[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = f.cos().double()[:, None, :], f.sin().double()[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def dense_block_logits(
    sd: dict[str, torch.Tensor],
    target_sd: dict[str, torch.Tensor],
    aux: torch.Tensor,  # [P, A*H] context rows for positions 0..P-1
    block: list[int],  # tokens at positions P..P+B-1
    *,
    causal: bool,
    kept: list[int] | None,
    num_layers: int = 2,
) -> torch.Tensor:
    """Block logits [B, Vt] from the checkpoint tensors, one sequence, no cache."""
    embed = sd.get("embed_tokens.weight", target_sd["model.embed_tokens.weight"])
    lm_head = sd.get("lm_head.weight", target_sd["lm_head.weight"])
    p_len, b_len = aux.shape[0], len(block)
    c = _rms(aux @ sd["fc.weight"].T, sd["hidden_norm.weight"])  # [P, H]
    ctx_pos, blk_pos = torch.arange(p_len), torch.arange(p_len, p_len + b_len)
    x = embed[block]  # [B, H]
    for layer in range(num_layers):

        def w(name: str, layer: int = layer) -> torch.Tensor:
            return sd[f"layers.{layer}.{name}.weight"]

        def proj(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
            return (t @ w(f"self_attn.{name}").T).view(t.shape[0], n, HD)

        h = _rms(x, w("input_layernorm"))
        q = _rope(_rms(proj(h, "q_proj", N_HEADS), w("self_attn.q_norm")), blk_pos)
        kb = _rope(_rms(proj(h, "k_proj", N_KV), w("self_attn.k_norm")), blk_pos)
        kc = _rope(_rms(proj(c, "k_proj", N_KV), w("self_attn.k_norm")), ctx_pos)
        rep = N_HEADS // N_KV
        k = torch.cat([kc, kb]).repeat_interleave(rep, dim=1)  # [P+B, nH, hd]
        v = torch.cat([proj(c, "v_proj", N_KV), proj(h, "v_proj", N_KV)])
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD)  # [nH, B, P+B]
        if causal:
            future = torch.arange(p_len + b_len)[None, :] > blk_pos[:, None]
            scores = scores.masked_fill(future, float("-inf"))
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(b_len, -1)
        x = x + o @ w("self_attn.o_proj").T
        h = _rms(x, w("post_attention_layernorm"))
        gate = torch.nn.functional.silu(h @ w("mlp.gate_proj").T)
        x = x + (gate * (h @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
    logits = _rms(x, sd["norm.weight"]) @ lm_head.T  # [B, Vd]
    if kept is None:
        return logits
    full = logits.new_full((b_len, VT), float("-inf"))
    full[:, kept] = logits
    return full


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("causal", [True, False])
def test_block_matches_dense(
    causal: bool, mode: str, world: dict[str, Any], tmp_path: Path
) -> None:
    """Two sequences, two rounds each (plus a retried round): paged logits == dense logits."""
    kept = world["kept"] if causal else None
    opts: dict[str, Any] = {"non_causal": not causal, "draft_vocab": kept, "seed": 7}
    sd = write_dflash(tmp_path, world["target_dir"], world["sd"], k=3, aux_ids=[1, 3], **opts)
    prop = _proposer(tmp_path, cache=CacheConfig(block_size=4))
    captured: list[torch.Tensor] = []
    compute_logits = prop.runner.compute_logits

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        captured.append(compute_logits(hidden))
        return captured[-1]

    prop.runner.compute_logits = capture  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(3)
    tokens = [torch.randint(0, MASK, (14,), generator=gen).tolist() for _ in range(2)]
    aux = [torch.randn(14, 2 * H, generator=gen, dtype=torch.float64) for _ in range(2)]
    rounds = [[(0, 7, 3), (0, 4, 2)], [(7, 3, 3), (4, 5, 1)], [(7, 3, 3), (4, 5, 1)]]
    for rnd in rounds:
        items = [
            ProposeItem(
                Delta(b, s, tokens[b][s : s + n]),
                k,
                aux[b][max(s - 1, 0) : s + n - 1],
                GREEDY if s == 0 else None,
            )
            for b, (s, n, k) in enumerate(rnd)
        ]
        captured.clear()
        res = prop.propose(items, mode)  # type: ignore[arg-type]
        assert len(captured) == (1 if mode == "parallel" else 3)
        want: list[list[torch.Tensor]] = [[], []]
        for b, (s, n, k) in enumerate(rnd):
            ctx, bonus = aux[b][: s + n - 1], tokens[b][s + n - 1]
            drafts = res.draft_token_ids[b]
            assert len(drafts) == k
            for i in range(1, k + 1):
                if mode == "parallel":
                    block, row = [bonus, *[MASK] * k], i
                else:
                    block, row = [bonus, *drafts[: i - 1], MASK], i
                dense = dense_block_logits(sd, world["sd"], ctx, block, causal=causal, kept=kept)
                want[b].append(dense[row])
            assert drafts == [int(r.argmax()) for r in want[b]]
        if mode == "parallel":
            got = captured[0]
            flat = [r for rows in want for r in rows]
        else:
            got = torch.cat(captured)
            flat = [want[b][i] for i in range(3) for b in range(2) if i < len(want[b])]
        torch.testing.assert_close(got, torch.stack(flat), rtol=1e-6, atol=1e-6)
    prop.release([0, 1])
    assert prop.kv_usage()["num_used_blocks"] == 0


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_draft_sampling_probs(mode: str, world: dict[str, Any]) -> None:
    """Sampled drafts come with their q rows over the target vocabulary (zero off the d2t map)."""
    path = world["root"] / "d2t"
    spec = resolve_speculative(SpeculativeConfig(model=str(path), draft_sampling=True))
    assert spec is not None
    wcfg = WorkerConfig(model=ModelConfig(path=str(path), dtype="float64"))
    prop = DFlashProposer(spec, wcfg, target_vocab_size=VT, target_num_layers=4)
    aux = torch.randn(5, 2 * H, dtype=torch.float64)
    params = SamplingParams(temperature=0.8, seed=1)
    items = [ProposeItem(Delta(0, 0, [5, 6, 7, 8, 9, 10]), 3, aux, params)]
    res = prop.propose(items, mode)  # type: ignore[arg-type]
    q = res.draft_probs[0]
    assert q is not None and q.shape == (3, VT)
    torch.testing.assert_close(q.sum(-1), torch.ones(3, dtype=q.dtype))
    off = torch.ones(VT, dtype=torch.bool).index_fill_(0, torch.tensor(world["kept"]), False)
    assert float(q[:, off].abs().max()) == 0.0
    assert all(q[i, t] > 0 for i, t in enumerate(res.draft_token_ids[0]))
