"""Tiny random HF models through outrider's loader: logits and aux hidden states vs transformers.

Every model runs in float64 with several prompts packed into one paged forward, then one
decode step that reads the paged cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.kernels.attention.torch_ref import BACKEND as TORCH_ATTENTION
from outrider.workers.config import ModelConfig
from outrider.workers.forward_context import ForwardContext, forward_context
from outrider.workers.layers.moe import FusedMoE
from outrider.workers.models.base import IntermediateTensors, ModelOutput
from outrider.workers.models.loader import ModelLoadError, load_model

BLOCK_SIZE = 4
NUM_BLOCKS = 32
DTYPE = torch.float64
# NOTE: HF's sdpa path keeps float64 end to end and outrider follows HF's float32 norm and router
# statistics, so the two agree to ~1e-15; the bar leaves room for BLAS reordering only.
TOL = 1e-9
Pair = tuple[torch.nn.Module, torch.nn.Module, PretrainedConfig]  # (transformers, outrider, config)
COMMON = dict(
    vocab_size=192,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


def _configs() -> dict[str, PretrainedConfig]:
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return {
        "llama": LlamaConfig(
            **COMMON,
            intermediate_size=128,
            num_hidden_layers=3,
            rope_parameters=llama3_rope,
            tie_word_embeddings=True,
        ),
        "qwen2": Qwen2Config(**COMMON, intermediate_size=128, num_hidden_layers=2),
        "qwen3": Qwen3Config(**COMMON, intermediate_size=128, num_hidden_layers=2, head_dim=32),
        "qwen3_moe": Qwen3MoeConfig(
            **COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        ),
        "mixtral": MixtralConfig(
            **COMMON,
            intermediate_size=48,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    }


def _randomize(model: torch.nn.Module) -> None:
    # NOTE: HF's 0.02 init makes attention near-uniform, which would hide rotary/mask bugs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)


@pytest.fixture(scope="module", params=list(_configs()))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    torch.manual_seed(0)
    config = _configs()[request.param]
    ref = AutoModelForCausalLM.from_config(
        config, attn_implementation="sdpa", experts_implementation="eager"
    ).to(DTYPE)
    _randomize(ref)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    model, hf_config = load_model(
        ModelConfig(path=str(path)), device="cpu", dtype=DTYPE, moe_backend="torch"
    )
    return ref.eval(), model, hf_config


class PagedBatch:
    """A hand-rolled block allocator and the metadata of one forward."""

    def __init__(self, hf_config: PretrainedConfig, num_layers: int) -> None:
        head_dim = getattr(hf_config, "head_dim", None) or (
            hf_config.hidden_size // hf_config.num_attention_heads
        )
        shape = (NUM_BLOCKS, BLOCK_SIZE, hf_config.num_key_value_heads, head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=DTYPE), torch.zeros(shape, dtype=DTYPE))
            for _ in range(num_layers)
        ]
        # NOTE: blocks handed out from the top so tables are not the identity.
        self.free = list(range(NUM_BLOCKS))
        self.tables: list[list[int]] = []
        self.lens: list[int] = []

    def step(
        self, new_tokens: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        if not self.tables:
            self.tables = [[] for _ in new_tokens]
            self.lens = [0 for _ in new_tokens]
        ids, positions, slots, q_start = [], [], [], [0]
        for b, toks in enumerate(new_tokens):
            for tok in toks:
                pos = self.lens[b]
                if pos % BLOCK_SIZE == 0:
                    self.tables[b].append(self.free.pop())
                ids.append(tok)
                positions.append(pos)
                slots.append(self.tables[b][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
                self.lens[b] += 1
            q_start.append(q_start[-1] + len(toks))
        width = max(len(t) for t in self.tables)
        tables = [t + [0] * (width - len(t)) for t in self.tables]
        q_lens = [len(t) for t in new_tokens]
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor(q_start),
            seq_lens=torch.tensor(self.lens),
            block_tables=torch.tensor(tables),
            max_query_len=max(q_lens),
            max_seq_len=max(self.lens),
            query_lens_cpu=q_lens,
            seq_lens_cpu=list(self.lens),
        )
        return torch.tensor(ids), torch.tensor(positions), md


def _run(
    model: torch.nn.Module,
    batch: PagedBatch,
    tokens: list[list[int]],
    aux: tuple[int, ...] = (),
    intermediate: IntermediateTensors | None = None,
) -> tuple[ModelOutput, torch.Tensor | None]:
    ids, pos, md = batch.step(tokens)
    with torch.no_grad(), forward_context(ForwardContext(md, batch.kv_caches, TORCH_ATTENTION)):
        out = model(ids if intermediate is None else None, pos, intermediate, aux)
        logits = None if out.hidden_states is None else model.compute_logits(out.hidden_states)
    return out, logits


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _hf_forward(
    ref: torch.nn.Module, tokens: list[int]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    def hook(_mod: torch.nn.Module, _inp: object, out: object) -> None:
        captured["last"] = out[0] if isinstance(out, tuple) else out

    handle = ref.model.layers[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = ref(torch.tensor([tokens]), output_hidden_states=True)
    finally:
        handle.remove()
    return out.logits[0], out.hidden_states, captured["last"][0]


def test_prefill_decode_and_aux_match_transformers(pair: Pair) -> None:
    ref, model, hf_config = pair
    torch.manual_seed(1)
    n_layers = hf_config.num_hidden_layers
    vocab = hf_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (7, 3, 11)]
    batch = PagedBatch(hf_config, n_layers)
    aux_ids = (0, 1, n_layers)
    out, logits = _run(model, batch, prompts, aux_ids)
    starts = [0, 7, 10, 21]
    for b, prompt in enumerate(prompts):
        rows = slice(starts[b], starts[b + 1])
        hf_logits, hf_hidden, hf_last = _hf_forward(ref, prompt)
        assert _rel_err(logits[rows], hf_logits) < TOL
        assert _rel_err(out.aux_hidden_states[0][rows], hf_hidden[0][0]) < TOL
        assert _rel_err(out.aux_hidden_states[1][rows], hf_hidden[1][0]) < TOL
        assert _rel_err(out.aux_hidden_states[n_layers][rows], hf_last) < TOL
    assert set(out.aux_hidden_states) == set(aux_ids)

    # one decode step per sequence, reading the cache written by the prefill
    nxt = [[int(logits[starts[b + 1] - 1].argmax())] for b in range(len(prompts))]
    _, step_logits = _run(model, batch, nxt)
    for b, prompt in enumerate(prompts):
        hf_logits, _, _ = _hf_forward(ref, prompt + nxt[b])
        assert _rel_err(step_logits[b], hf_logits[-1]) < TOL


def test_pipeline_stages_compose(pair: Pair) -> None:
    ref, model, hf_config = pair
    n_layers = hf_config.num_hidden_layers
    torch.manual_seed(2)
    prompt = torch.randint(0, hf_config.vocab_size, (6,)).tolist()
    split = (n_layers + 1) // 2
    full, full_logits = _run(model, PagedBatch(hf_config, n_layers), [prompt], (0, split, n_layers))
    state = model.state_dict()
    stages = []
    for lo, hi in ((0, split), (split, n_layers)):
        stage = type(model)(hf_config, start_layer=lo, end_layer=hi).to(DTYPE)
        missing = stage.load_state_dict(state, strict=False).missing_keys
        assert not missing
        stages.append(stage)
    b0, b1 = PagedBatch(hf_config, split), PagedBatch(hf_config, n_layers - split)
    first, _ = _run(stages[0], b0, [prompt], (0, split))
    assert first.hidden_states is None and first.intermediate is not None
    assert set(first.aux_hidden_states) == {0}
    last, last_logits = _run(stages[1], b1, [prompt], (0, split, n_layers), first.intermediate)
    assert set(last.aux_hidden_states) == {split, n_layers}
    assert torch.equal(last_logits, full_logits)
    assert torch.equal(last.aux_hidden_states[split], full.aux_hidden_states[split])


def test_moe_layers_and_backend(pair: Pair) -> None:
    _, model, hf_config = pair
    moe = [m for m in model.modules() if isinstance(m, FusedMoE)]
    sparse = {"qwen3_moe": 2, "mixtral": 2}.get(hf_config.model_type, 0)
    assert len(moe) == sparse
    assert model.moe_backend == "torch" and all(m.moe_backend == "torch" for m in moe)


def test_malformed_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(
            ModelConfig(path=str(tmp_path / "nope")), device="cpu", dtype=DTYPE, moe_backend="torch"
        )
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(path=str(tmp_path)), device="cpu", dtype=DTYPE, moe_backend="torch")
    LlamaConfig(**COMMON, intermediate_size=32, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        load_model(ModelConfig(path=str(tmp_path)), device="cpu", dtype=DTYPE, moe_backend="torch")
    cfg = LlamaConfig(**COMMON, intermediate_size=32, num_hidden_layers=1)
    cfg.architectures = ["FancyNewForCausalLM"]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported model architecture FancyNew"):
        load_model(ModelConfig(path=str(tmp_path)), device="cpu", dtype=DTYPE, moe_backend="torch")


def test_loads_in_memory_transformers_names(pair: Pair) -> None:
    """transformers 5 keeps experts stacked (``experts.gate_up_proj``) in memory; both layouts
    must load to the same parameters."""
    ref, model, hf_config = pair
    again = type(model)(hf_config).to(DTYPE)
    loaded = again.load_weights(ref.state_dict().items())
    assert loaded == {name for name, _ in again.named_parameters()}
    for (name, a), (_, b) in zip(again.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_tp_weight_loaders_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    from outrider.workers import distributed
    from outrider.workers.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from outrider.workers.layers.moe import FusedMoE
    from outrider.workers.layers.vocab import VocabParallelEmbedding

    torch.manual_seed(0)
    hd, n_heads, n_kv, hidden = 4, 4, 1, 8
    q, k, v = (torch.randn(n * hd, hidden) for n in (n_heads, n_kv, n_kv))
    gate, up, down = torch.randn(6, hidden), torch.randn(6, hidden), torch.randn(hidden, 6)
    emb = torch.randn(11, hidden)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "_TP", distributed.ParallelGroup(rank=rank, size=2))
        qkv = QKVParallelLinear(hidden, hd, n_heads, n_kv)
        for shard, w in (("q", q), ("k", k), ("v", v)):
            qkv.weight.weight_loader(qkv.weight, w, shard)
        mlp = MergedColumnParallelLinear(hidden, [6, 6])
        mlp.weight.weight_loader(mlp.weight, gate, 0)
        mlp.weight.weight_loader(mlp.weight, up, 1)
        row = RowParallelLinear(6, hidden)
        row.weight.weight_loader(row.weight, down)
        moe = FusedMoE(2, 1, hidden, 6, renormalize=True)
        for e in range(2):
            moe.w13_weight.weight_loader(moe.w13_weight, gate, "w1", e)
            moe.w13_weight.weight_loader(moe.w13_weight, up, "w3", e)
            moe.w2_weight.weight_loader(moe.w2_weight, down, "w2", e)
        vocab = VocabParallelEmbedding(11, hidden)
        vocab.weight.weight_loader(vocab.weight, emb)
        shards.append((qkv, mlp, row, moe, vocab))
    (qkv0, mlp0, row0, moe0, voc0), (qkv1, mlp1, row1, moe1, voc1) = shards
    # 4 heads -> 2 per rank; the single KV head is replicated on both ranks
    assert torch.equal(qkv0.weight, torch.cat([q[:8], k, v]))
    assert torch.equal(qkv1.weight, torch.cat([q[8:], k, v]))
    assert torch.equal(mlp1.weight, torch.cat([gate[3:], up[3:]]))
    assert torch.equal(torch.cat([row0.weight, row1.weight], 1), down)
    assert torch.equal(moe1.w13_weight[1], torch.cat([gate[3:], up[3:]]))
    assert torch.equal(torch.cat([moe0.w2_weight, moe1.w2_weight], 2)[0], down)
    assert torch.equal(torch.cat([voc0.weight, voc1.weight])[:11], emb)
    assert voc1.weight.shape == (6, hidden) and not voc1.weight[5].any()
