"""EAGLE-3 / P-EAGLE drafters from speculators-format checkpoints: loading, math, losslessness."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, Qwen3Config

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.workers.config import (
    CacheConfig,
    ConfigError,
    ModelConfig,
    SamplingParams,
    WorkerConfig,
)
from outrider.workers.models.base import ModelLoadError
from outrider.workers.proposers.base import ProposeItem
from outrider.workers.proposers.eagle3 import Eagle3Proposer
from outrider.workers.proposers.factory import drafter_worker_config, resolve_speculative
from outrider.workers.protocol import Delta
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.speculators import load_speculators_config

VT, H, MASK = 96, 64, 95
F64 = torch.float64


# -- speculators-format checkpoints ---------------------------------------------------------------
def layer_config(kind: str = "llama", *, layers: int = 1, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "vocab_size": VT,
        "hidden_size": H,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": layers,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        **kw,
    }
    cfg = LlamaConfig(**base) if kind == "llama" else Qwen3Config(**{"head_dim": 16, **base})
    out = cfg.to_diff_dict()
    out["architectures"] = ["LlamaForCausalLM" if kind == "llama" else "Qwen3ForCausalLM"]
    return out


def write_checkpoint(
    path: Path,
    tensors: dict[str, torch.Tensor],
    layer_cfg: dict[str, Any],
    *,
    model_type: str = "eagle3",
    k: int = 3,
    aux_ids: list[int] | None = None,
    draft_vocab: int = VT,
    dtype: torch.dtype = torch.bfloat16,
    **flags: Any,
) -> Path:
    """config.json + model.safetensors as speculators' ``save_pretrained`` writes them."""
    peagle = model_type == "peagle"
    cls = "PEagle" if peagle else "Eagle3"
    config: dict[str, Any] = {
        "architectures": [f"{cls}DraftModel"],
        "auto_map": {"": f"config.{cls}SpeculatorConfig"},
        "draft_vocab_size": draft_vocab,
        "dtype": str(dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": aux_ids,
        "embed_requires_grad": peagle,
        "fc_norm": False,
        "norm_before_fc": False,
        "norm_before_residual": True,
        "norm_output": False,
        "speculators_config": {
            "algorithm": model_type,
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "accept_tolerance": 0.0,
                    "proposal_type": "greedy",
                    "speculative_tokens": k,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": "tiny/llama"},
        },
        "speculators_model_type": model_type,
        "speculators_version": "0.9.0",
        "target_hidden_size": None,
        "tie_word_embeddings": False,
        "transformer_layer_config": layer_cfg,
        "transformers_version": "5.23.0",
        **({"mask_token_id": MASK} if peagle else {}),
    }
    config.update(flags)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    stored = {n: (t.to(dtype) if t.is_floating_point() else t).clone() for n, t in tensors.items()}
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _dims(cfg: dict[str, Any]) -> tuple[int, int, int, int, int]:
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return (
        nh,
        nkv,
        cfg.get("head_dim") or H // nh,
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
    )


def random_tensors(
    cfg: dict[str, Any],
    *,
    num_aux: int,
    seed: int = 0,
    kept: torch.Tensor | None = None,
    peagle: bool = False,
    norm_before_fc: bool = False,
    fc_norm: bool = False,
    embed: bool = True,
    lm_head: bool = True,
) -> dict[str, torch.Tensor]:
    """Every §4.2 tensor of a draft, random; ``kept`` (sorted target ids) adds d2t/t2d."""
    g = torch.Generator().manual_seed(seed)
    nh, nkv, hd, inter, layers = _dims(cfg)

    def w(*shape: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g, dtype=F64)

    t = {"fc.weight": w(H, num_aux * H), "norm.weight": norm(H)}
    if norm_before_fc:
        t["input_norm.weight"] = norm(num_aux * H)
    for j in range(num_aux if fc_norm else 0):
        t[f"fc_norm.{j}.weight"] = norm(H)
    for layer in range(layers):
        p, width = f"layers.{layer}.", 2 * H if layer == 0 else H
        if layer == 0:
            t[p + "hidden_norm.weight"] = norm(H)
        t[p + "input_layernorm.weight"] = norm(H)
        t[p + "post_attention_layernorm.weight"] = norm(H)
        for name, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            t[p + f"self_attn.{name}_proj.weight"] = w(rows, width)
            if cfg.get("attention_bias"):
                t[p + f"self_attn.{name}_proj.bias"] = w(rows)
        t[p + "self_attn.o_proj.weight"] = w(H, nh * hd)
        if cfg.get("attention_bias"):
            t[p + "self_attn.o_proj.bias"] = w(H)
        if cfg["model_type"] == "qwen3":
            t[p + "self_attn.q_norm.weight"] = norm(hd)
            t[p + "self_attn.k_norm.weight"] = norm(hd)
        t[p + "mlp.gate_proj.weight"] = w(inter, H)
        t[p + "mlp.up_proj.weight"] = w(inter, H)
        t[p + "mlp.down_proj.weight"] = w(H, inter)
    vd = VT if kept is None else len(kept)
    if lm_head:
        t["lm_head.weight"] = w(vd, H, scale=0.5)
    if embed:
        t["embed_tokens.weight"] = w(VT, H, scale=1.0)
    if kept is not None:
        t["d2t"] = kept - torch.arange(vd)
        t2d = torch.zeros(VT, dtype=torch.bool)
        t2d[kept] = True
        t["t2d"] = t2d
    if peagle:
        t["mask_hidden"] = w(1, 1, num_aux * H, scale=1.0)
    return t


# -- a dense reference of the EAGLE-3 forward (spec §4.3) ------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.to(torch.float32)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    ang = pos.float()[:, None, None] * inv  # [n, 1, hd/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def ref_forward(
    t: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    flags: dict[str, bool],
    tokens: list[int],
    hidden: torch.Tensor,  # [n, H]
    positions: list[int],
) -> torch.Tensor:
    nh, nkv, hd, _, layers = _dims(cfg)
    theta = float(cfg["rope_parameters"]["rope_theta"])
    pos = torch.tensor(positions)
    n = len(tokens)
    x = hidden
    for layer in range(layers):
        p = f"layers.{layer}."
        if layer == 0:
            e = _rms(t["embed_tokens.weight"][tokens], t[p + "input_layernorm.weight"])
            xh = _rms(x, t[p + "hidden_norm.weight"])
            res, u = (xh if flags["norm_before_residual"] else x), torch.cat([e, xh], -1)
        else:
            res, u = x, _rms(x, t[p + "input_layernorm.weight"])
        qkv = [
            F.linear(u, t[p + f"self_attn.{m}_proj.weight"], t.get(p + f"self_attn.{m}_proj.bias"))
            for m in "qkv"
        ]
        q, k, v = (a.view(n, -1, hd) for a in qkv)
        if cfg["model_type"] == "qwen3":
            q, k = (
                _rms(q, t[p + "self_attn.q_norm.weight"]),
                _rms(k, t[p + "self_attn.k_norm.weight"]),
            )
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * hd**-0.5
        scores = scores.masked_fill(pos[None, None, :] > pos[None, :, None], float("-inf"))
        a = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, nh * hd)
        y = res + F.linear(a, t[p + "self_attn.o_proj.weight"], t.get(p + "self_attn.o_proj.bias"))
        m = _rms(y, t[p + "post_attention_layernorm.weight"])
        gate = F.silu(F.linear(m, t[p + "mlp.gate_proj.weight"]))
        x = y + F.linear(
            gate * F.linear(m, t[p + "mlp.up_proj.weight"]), t[p + "mlp.down_proj.weight"]
        )
    return x  # [n, H]


def ref_fuse(t: dict[str, torch.Tensor], flags: dict[str, bool], aux: torch.Tensor) -> torch.Tensor:
    if flags.get("norm_before_fc"):
        aux = _rms(aux, t["input_norm.weight"])
    if flags.get("fc_norm"):
        parts = aux.split(H, -1)
        aux = torch.cat([_rms(c, t[f"fc_norm.{j}.weight"]) for j, c in enumerate(parts)], -1)
    return F.linear(aux, t["fc.weight"])


def ref_probs(t: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    logits = F.linear(_rms(z, t["norm.weight"]), t["lm_head.weight"])
    if "d2t" not in t:
        return logits.softmax(-1)
    full = logits.new_full((z.shape[0], VT), float("-inf"))
    full[:, torch.arange(len(t["d2t"])) + t["d2t"]] = logits
    return full.softmax(-1)


def _proposer(
    ckpt: Path,
    target_model: ModelConfig | None = None,
    **spec: Any,
) -> Eagle3Proposer:
    target = WorkerConfig(
        model=target_model or ModelConfig(dtype="float64"), cache=CacheConfig(block_size=4)
    )
    resolved = resolve_speculative(
        SpeculativeConfig(model=str(ckpt), cache=CacheConfig(block_size=4), **spec), target
    )
    assert resolved is not None
    return Eagle3Proposer(
        resolved,
        drafter_worker_config(resolved, target),
        target_vocab_size=VT,
        target_num_layers=4,
        target_model=target_model,
    )


class RefSeq:
    """The draft KV entries of one sequence, kept densely: token x_{i+1}, fused g_i at i."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.hidden: list[torch.Tensor] = []

    def ingest(self, delta: Delta, fused: torch.Tensor) -> None:
        keep = max(delta.start_pos - 1, 0)
        toks = delta.token_ids[1:] if delta.start_pos == 0 else delta.token_ids
        self.tokens = self.tokens[:keep] + toks
        self.hidden = self.hidden[:keep] + list(fused)


REF_CASES: dict[str, tuple[str, int, str, bool, dict[str, bool]]] = {
    "llama-eagle3": ("llama", 1, "eagle3", False, {}),
    "qwen3-eagle3-d2t-norms": (
        "qwen3",
        2,
        "eagle3",
        False,
        {"norm_before_fc": True, "norm_output": True, "norm_before_residual": False},
    ),
    "llama-peagle-fc_norm": ("llama", 2, "peagle", True, {"fc_norm": True}),
    "qwen3-peagle": ("qwen3", 1, "peagle", False, {"norm_before_residual": False}),
}


@pytest.mark.parametrize("case", list(REF_CASES))
def test_drafts_match_dense_reference(case: str, tmp_path: Path) -> None:
    """Draft probabilities over rounds (with a rollback) equal a dense re-computation."""
    kind, layers, model_type, bias, extra = REF_CASES[case]
    cfg = layer_config(kind, layers=layers, attention_bias=bias, rope_theta=10000.0)
    flags = {"norm_before_residual": True, "norm_output": False, **extra}
    kept = torch.arange(0, VT, 2) if "d2t" in case else None
    t = random_tensors(
        cfg,
        num_aux=2,
        kept=kept,
        peagle=model_type == "peagle",
        norm_before_fc=flags.get("norm_before_fc", False),
        fc_norm=flags.get("fc_norm", False),
    )
    ckpt = write_checkpoint(
        tmp_path / "d",
        t,
        cfg,
        model_type=model_type,
        aux_ids=[2, 1],
        draft_vocab=VT if kept is None else len(kept),
        dtype=F64,
        **flags,
    )
    prop = _proposer(ckpt, draft_sampling=True, dtype="float64")
    parallel = model_type == "peagle"
    assert prop.capabilities.parallel_drafting is parallel
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VT, (2, 16), generator=g).tolist()
    aux = torch.randn(2, 16, 2 * H, generator=g, dtype=F64)
    params = SamplingParams(temperature=1.0, seed=11)
    rounds = [  # (seq, start, end, k)
        [(0, 0, 6, 3), (1, 0, 2, 2)],
        [(0, 6, 9, 3), (1, 2, 3, 0)],
        [(0, 4, 7, 4), (1, 3, 4, 3)],  # seq 0 rolls back to position 4 with new tokens
    ]
    refs = [RefSeq(), RefSeq()]
    mask = ref_fuse(t, flags, t["mask_hidden"].view(1, -1))[0] if parallel else None
    for r, batch in enumerate(rounds):
        if r == 2:
            x[0][4:] = [(v + 1) % VT for v in x[0][4:]]
            aux[0, 3:] = torch.randn(13, 2 * H, generator=g, dtype=F64)
        items = [
            ProposeItem(
                Delta(s, a, x[s][a:e]), k, aux[s, max(a - 1, 0) : e - 1], params if a == 0 else None
            )
            for s, a, e, k in batch
        ]
        res = prop.propose(items, "parallel" if parallel else "sequential")
        for i, (s, _, _, k) in enumerate(batch):
            it, ref = items[i], refs[s]
            ref.ingest(it.delta, ref_fuse(t, flags, it.hidden_states))
            drafts = res.draft_token_ids[i]
            assert len(drafts) == k
            if k == 0:
                continue
            got = res.draft_probs[i]
            assert got is not None and got.shape == (k, VT)
            if parallel:
                toks = ref.tokens + [MASK] * (k - 1)
                hid = torch.stack(ref.hidden + [mask] * (k - 1))
                z = ref_forward(t, cfg, flags, toks, hid, list(range(len(toks))))
                want = ref_probs(t, z[-k:])
            else:
                toks, hid, rows = list(ref.tokens), list(ref.hidden), []
                for j in range(k):
                    z = ref_forward(t, cfg, flags, toks, torch.stack(hid), list(range(len(toks))))
                    rows.append(ref_probs(t, z[-1:])[0])
                    fed = _rms(z[-1], t["norm.weight"]) if flags["norm_output"] else z[-1]
                    toks.append(drafts[j])
                    hid.append(fed)
                want = torch.stack(rows)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
            if kept is not None:
                assert set(drafts) <= set(kept.tolist())
    prop.release([0, 1])
    assert prop.runner.kv.num_used_blocks == 0


# -- a drafter that tracks a near-bigram target (so acceptance paths run) --------------------------
PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [40, 41, 42],
    [9, 10, 11, 12, 13, 14, 15, 9, 10, 11, 12, 13, 14, 15, 9, 10],
    [70],
]
GREEDY = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)


def tracking_tensors(
    target: torch.nn.Module, cfg: dict[str, Any], *, kept: torch.Tensor | None = None, **kw: Any
) -> dict[str, torch.Tensor]:
    """Layer 0 attends to its own entry only and passes RMS(embed) through; the target's
    norm + head then predict the target's next token from the current one alone."""
    t = random_tensors(cfg, num_aux=2, kept=kept, embed=False, lm_head=False, **kw)
    sd = target.state_dict()
    eye, zeros = torch.eye(H, dtype=F64), torch.zeros(H, dtype=F64)
    # NOTE: with rope_theta 2 and equal q/k biases the score peaks at distance 0 by > 50 logits.
    qk = torch.full((H,), 7.0, dtype=F64)
    p = "layers.0."
    t.update(
        {
            p + "hidden_norm.weight": torch.full((H,), 0.05, dtype=F64),
            p + "input_layernorm.weight": torch.ones(H, dtype=F64),
            p + "self_attn.q_proj.weight": torch.zeros(H, 2 * H, dtype=F64),
            p + "self_attn.k_proj.weight": torch.zeros(H, 2 * H, dtype=F64),
            p + "self_attn.v_proj.weight": torch.cat([eye, torch.zeros(H, H, dtype=F64)], 1),
            p + "self_attn.q_proj.bias": qk,
            p + "self_attn.k_proj.bias": qk,
            p + "self_attn.v_proj.bias": zeros,
            p + "self_attn.o_proj.weight": eye,
            p + "self_attn.o_proj.bias": zeros,
            p + "mlp.down_proj.weight": torch.zeros(H, 128, dtype=F64),
            "norm.weight": sd["model.norm.weight"],
            "fc.weight": 0.3 * t["fc.weight"],
        }
    )
    if kept is not None:
        t["lm_head.weight"] = sd["lm_head.weight"][kept]
    return t


@pytest.fixture(scope="module")
def target(tiny_model, tmp_path_factory) -> tuple[Path, torch.nn.Module]:  # type: ignore[no-untyped-def]
    """The tiny llama with attention/MLP outputs scaled down: nearly a bigram model."""
    _, base = tiny_model("llama")
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.01)
    path = tmp_path_factory.mktemp("eagle3-target")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def plain(target) -> list[list[int]]:  # type: ignore[no-untyped-def]
    llm = LLM(OutriderConfig(target=_target(target[0])))
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def drafters(target, plain, tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("eagle3-drafters")
    cfg = layer_config("llama", num_key_value_heads=4, attention_bias=True, rope_theta=2.0)
    model = target[1]
    emitted = sorted({t for out in plain for t in out} | set(range(0, VT, 3)))
    kept = torch.tensor(emitted)
    embed = {"embed_tokens.weight": model.state_dict()["model.embed_tokens.weight"]}
    return {
        # embed_tokens and lm_head shared from the target
        "eagle3": write_checkpoint(
            root / "eagle3", tracking_tensors(model, cfg), cfg, aux_ids=[1, 3], dtype=F64
        ),
        # its own embed_tokens; lm_head shared
        "peagle": write_checkpoint(
            root / "peagle",
            {**tracking_tensors(model, cfg, peagle=True), **embed},
            cfg,
            model_type="peagle",
            aux_ids=[1, 3],
            dtype=F64,
            norm_before_residual=False,
        ),
        # Vd < Vt: lm_head rows of the kept ids, d2t/t2d
        "eagle3-d2t": write_checkpoint(
            root / "d2t",
            tracking_tensors(model, cfg, kept=kept),
            cfg,
            aux_ids=[1, 3],
            draft_vocab=len(emitted),
            dtype=F64,
        ),
    }


def _target(path: Path) -> WorkerConfig:
    return WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"), cache=CacheConfig(block_size=4)
    )


def _spec_llm(target_path: Path, ckpt: Path, k: int, **spec: Any) -> LLM:
    speculative = SpeculativeConfig(model=str(ckpt), num_speculative_tokens=k, **spec)
    return LLM(OutriderConfig(target=_target(target_path), speculative=speculative))


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("drafter", ["eagle3", "peagle", "peagle-sequential", "eagle3-d2t"])
def test_lossless_greedy(drafter: str, k: int, target, plain, drafters) -> None:  # type: ignore[no-untyped-def]
    forced = drafter == "peagle-sequential"
    extra = {"parallel_drafting": False} if forced else {}
    llm = _spec_llm(target[0], drafters[drafter.removesuffix("-sequential")], k, **extra)
    caps = llm.drafter.capabilities  # type: ignore[union-attr]
    assert caps.needs_target_hidden_states and caps.aux_layer_ids == (1, 3)
    assert llm.verifier.aux_layer_ids == (1, 3)
    assert caps.parallel_drafting is (drafter == "peagle")
    assert caps.fallback_reason == ("parallel_drafting_disabled" if forced else None)
    assert llm.engine.mode == ("parallel" if drafter == "peagle" else "sequential")
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == plain
    stats = llm.engine.stats.spec
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    rate = stats.num_accepted_tokens / stats.num_draft_tokens
    if drafter.startswith("eagle3") and k <= 3:
        assert rate > 0.3, rate  # NOTE: measured 0.57-0.76; the bar keeps the test non-vacuous
    assert llm.runner.kv.num_used_blocks == 0
    assert llm.drafter.kv_usage()["num_used_blocks"] == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("cut", ["max_tokens", "stop_token"])
@pytest.mark.parametrize("drafter", ["eagle3", "peagle"])
def test_cut_inside_accepted_block(cut: str, drafter: str, target, plain, drafters) -> None:  # type: ignore[no-untyped-def]
    llm = _spec_llm(target[0], drafters[drafter], 7)
    if cut == "max_tokens":
        lengths = (3, 10, 13, 1)
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        want = [r[:n] for r, n in zip(plain, lengths, strict=True)]
    else:
        stops = [r[11] for r in plain]
        params = [
            SamplingParams(temperature=0, max_tokens=29, stop_token_ids=[s], ignore_eos=True)
            for s in stops
        ]
        want = [r[: r.index(s) + 1] for r, s in zip(plain, stops, strict=True)]
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == want
    assert all(o.finish_reason == ("length" if cut == "max_tokens" else "stop") for o in outs)
    assert llm.engine.stats.spec.num_accepted_tokens > 0


@pytest.mark.parametrize(
    ("setting", "fallback"),
    [
        ({}, None),
        ({"parallel_drafting": False}, "parallel_drafting_disabled"),
        ({"pipeline_parallel_size": 2}, "pipeline_parallel"),
    ],
)
def test_peagle_drafts_in_one_forward(  # type: ignore[no-untyped-def]
    setting: dict[str, Any], fallback: str | None, target, drafters
) -> None:
    """P-EAGLE: one drafter forward per round; its sequential fallback takes k."""
    source = ModelConfig(path=str(target[0]), dtype="float64")
    prop = _proposer(drafters["peagle"], source, dtype="float64", **setting)
    parallel = fallback is None
    caps = prop.capabilities
    assert (caps.method, caps.parallel_drafting, caps.fallback_reason) == (
        "peagle",
        parallel,
        fallback,
    )
    calls: list[int] = []
    prop.model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VT, (12,), generator=g).tolist()
    aux = torch.randn(12, 2 * H, generator=g, dtype=F64)
    for start, end, k in ((0, 6, 4), (6, 9, 4), (9, 10, 0), (10, 11, 1)):
        calls.clear()
        item = ProposeItem(Delta(0, start, x[start:end]), k, aux[max(start - 1, 0) : end - 1])
        # NOTE: a worker that cannot draft in parallel ignores the request.
        res = prop.propose([item], "parallel")
        assert len(res.draft_token_ids[0]) == k
        entries = end - start - (1 if start == 0 else 0)
        if parallel:
            assert calls == [entries + max(k - 1, 0)]  # context + mask entries, one forward
        else:
            assert calls == [entries] + [1] * (k - 1)


def test_aux_layer_convention(tmp_path: Path, target) -> None:  # type: ignore[no-untyped-def]
    cfg = layer_config("llama")
    t = random_tensors(cfg, num_aux=2)
    default = write_checkpoint(tmp_path / "default", t, cfg, aux_ids=None)
    ckpt = load_speculators_config(default)
    assert ckpt.aux_layer_ids is None
    assert ckpt.resolved_aux_layer_ids(32) == (2, 16, 29)
    assert ckpt.resolved_aux_layer_ids(4) == (1, 2)  # (2, 2, 1), sorted and deduplicated
    assert _proposer(default).capabilities.aux_layer_ids == (1, 2)
    listed = write_checkpoint(tmp_path / "listed", t, cfg, aux_ids=[3, 1, 3])
    assert load_speculators_config(listed).resolved_aux_layer_ids(4) == (1, 3)
    llm = _spec_llm(target[0], listed, 2)
    assert llm.drafter.capabilities.aux_layer_ids == (1, 3)  # type: ignore[union-attr]
    assert llm.verifier.aux_layer_ids == (1, 3)
    bad = write_checkpoint(tmp_path / "bad", t, cfg, aux_ids=[1, 5])
    with pytest.raises(ConfigError, match="aux hidden-state layer id 5"):
        _proposer(bad)


@pytest.mark.parametrize("variant", ["eagle3", "eagle3-shared", "peagle-d2t"])
def test_loading_checkpoint_variants(variant: str, tmp_path: Path, target) -> None:  # type: ignore[no-untyped-def]
    peagle = variant.startswith("peagle")
    kept = torch.tensor([0, 1, 3, 4, 8, 20, 33, 50, 51, 90, 95]) if "d2t" in variant else None
    cfg = layer_config("qwen3" if peagle else "llama")
    shared = variant != "eagle3"
    t = random_tensors(cfg, num_aux=2, kept=kept, peagle=peagle, embed=not shared)
    if variant == "eagle3-shared":
        del t["lm_head.weight"]
    t["verifier_lm_head.weight"] = torch.zeros(VT, H, dtype=F64)
    vd = VT if kept is None else len(kept)
    ckpt = write_checkpoint(
        tmp_path / "d",
        t,
        cfg,
        model_type="peagle" if peagle else "eagle3",
        k=5,
        aux_ids=[2, 1],
        draft_vocab=vd,
    )
    spec = resolve_speculative(SpeculativeConfig(model=str(ckpt)), _target(target[0]))
    assert spec is not None
    assert (spec.method, spec.num_speculative_tokens, spec.parallel_drafting) == (
        "eagle3",
        5,
        peagle,
    )
    prop = _proposer(ckpt, ModelConfig(path=str(target[0]), dtype="float64"))
    caps = prop.capabilities
    assert (caps.method, caps.parallel_drafting, caps.aux_layer_ids) == (
        "peagle" if peagle else "eagle3",
        peagle,
        (1, 2),
    )
    assert prop.mask_token_id == (MASK if peagle else None)
    model, sd = prop.model, target[1].state_dict()
    if kept is None:
        assert model.draft_to_target is None
    else:
        assert model.draft_to_target.tolist() == kept.tolist()  # type: ignore[union-attr]
    if shared:
        torch.testing.assert_close(model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    if variant == "eagle3-shared":
        torch.testing.assert_close(model.lm_head.weight, sd["lm_head.weight"])
    assert (model.mask_fused is not None) is peagle


@pytest.mark.parametrize(
    "key", ["speculative_tokens", "transformer_layer_config", "mask_token_id", "not_a_dict"]
)
def test_malformed_config_names_the_key(key: str, tmp_path: Path) -> None:
    cfg = layer_config("llama")
    t = random_tensors(cfg, num_aux=2)
    ckpt = write_checkpoint(tmp_path / "d", t, cfg, model_type="peagle")
    data = json.loads((ckpt / "config.json").read_text())
    if key == "speculative_tokens":
        del data["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    elif key == "not_a_dict":
        data["transformer_layer_config"] = "llama"
    else:
        del data[key]
    (ckpt / "config.json").write_text(json.dumps(data))
    name = "transformer_layer_config" if key == "not_a_dict" else key
    with pytest.raises(ConfigError, match=name):
        load_speculators_config(ckpt)
    with pytest.raises(ConfigError, match=name):
        resolve_speculative(SpeculativeConfig(model=str(ckpt)), _target(tmp_path))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("unexpected", "layers.0.self_attn.rotary.weight"),
        ("no-d2t", "no d2t tensor"),
        ("no-lm_head", "no lm_head.weight"),
        ("no-embed", "embed_tokens.weight"),
        ("no-mask_hidden", "mask_hidden"),
        ("midlayer", None),
    ],
)
def test_weight_errors_name_the_tensor(change: str, message: str | None, tmp_path: Path) -> None:
    cfg = layer_config("llama")
    kept = torch.arange(48) * 2 if change in ("no-d2t", "no-lm_head") else None
    peagle = change == "no-mask_hidden"
    t = random_tensors(cfg, num_aux=2, kept=kept, peagle=peagle)
    removed = {
        "no-d2t": "d2t",
        "no-lm_head": "lm_head.weight",
        "no-embed": "embed_tokens.weight",
        "no-mask_hidden": "mask_hidden",
    }
    if change in removed:
        del t[removed[change]]
    elif change == "unexpected":
        t["layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    else:
        t = {k.replace("layers.0.", "midlayer."): v for k, v in t.items()}
    vd = VT if kept is None else len(kept)
    model_type = "peagle" if peagle else "eagle3"
    ckpt = write_checkpoint(tmp_path / "d", t, cfg, model_type=model_type, draft_vocab=vd)
    if message is None:
        assert _proposer(ckpt).model.layers[0].hidden_norm.weight.dtype == torch.float64
        return
    with pytest.raises(ModelLoadError, match=message):
        _proposer(ckpt)
