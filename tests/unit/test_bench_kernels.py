"""``outrider bench-kernels`` on CPU: floor arithmetic, shapes, arguments, a tiny smoke run."""

from __future__ import annotations

import pytest
import torch

from outrider.cluster import bench_floors as bf
from outrider.cluster import bench_kernels as bk
from outrider.cluster import bench_steps as bs
from outrider.cluster.cli import build_parser, main
from outrider.workers.models.random_init import (
    LLAMA_3_1_8B,
    QWEN3_30B_A3B,
    SHAPES,
    build_random_model,
)

LLAMA = bf.ModelShape.from_config("llama8b", LLAMA_3_1_8B)
QWEN = bf.ModelShape.from_config("qwen3moe", QWEN3_30B_A3B)
BF16 = 2


def test_shape_names_match_random_init() -> None:
    assert bk.SHAPE_NAMES == tuple(SHAPES)


def test_published_parameter_counts() -> None:
    assert LLAMA.num_params == 8_030_261_248  # Llama-3.1-8B
    assert QWEN.num_params == 30_532_122_624  # Qwen3-30B-A3B
    assert (QWEN.num_experts, QWEN.top_k, QWEN.head_dim, QWEN.qk_norm) == (128, 8, 128, True)


SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_experts=6,
    num_experts_per_tok=2,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
)


@pytest.mark.parametrize("name", ["llama8b", "qwen3moe"])
def test_parameter_formula_matches_a_built_model(name: str) -> None:
    cfg = {**SHAPES[name], **{k: v for k, v in SMALL.items() if k in SHAPES[name]}}
    model, _ = build_random_model(cfg, device="cpu", dtype=torch.float32, std=0.5, seed=3)
    assert bf.ModelShape.from_config(name, cfg).num_params == sum(
        p.numel() for p in model.parameters()
    )
    weights = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert all(bool((p == 1).all()) for p in norms)
    std = torch.cat([p.flatten() for p in weights]).std()
    assert abs(float(std) - 0.5) < 0.01


def test_attention_cost() -> None:
    c = bf.attention_cost(LLAMA, 1, 4096, 1, BF16)
    kv_read = 2 * 4097 * 8 * 128 * BF16
    io = (2 * 32 * 128 + 2 * 8 * 128) * BF16
    assert c.bytes == kv_read + io
    assert c.flops == 4 * 32 * 128 * 4097
    # verify: 5 queries see 4097..4101 keys
    v = bf.attention_cost(LLAMA, 2, 4096, 5, BF16)
    assert v.flops == 2 * 4 * 32 * 128 * sum(range(4097, 4102))
    assert v.bytes == 2 * 2 * 4101 * 8 * 128 * BF16 + 10 * io


def test_floor_is_the_larger_of_memory_and_compute() -> None:
    c = bf.Cost(bytes=3e9, flops=5e11)
    assert c.floor_s(3e12, 1e15) == pytest.approx(1e-3)
    assert c.bound(3e12, 1e15) == "memory"
    assert c.floor_s(3e12, 1e14) == pytest.approx(5e-3)
    assert c.bound(3e12, 1e14) == "compute"
    assert (c + c).bytes == 6e9 and c.scaled(3).flops == 1.5e12


def test_expected_active_experts() -> None:
    assert bf.expected_active_experts(128, 8, 1) == pytest.approx(8.0)
    assert bf.expected_active_experts(128, 8, 0) == 0.0
    assert bf.expected_active_experts(128, 8, 64) == pytest.approx(128 * (1 - (120 / 128) ** 64))
    assert 127 < bf.expected_active_experts(128, 8, 512) <= 128


def test_moe_and_layer_costs() -> None:
    m = bf.moe_cost(QWEN, 1, 8, BF16)
    per_expert = 3 * 2048 * 768
    assert m.bytes == (8 * per_expert + 2048 * 128) * BF16 + 2 * 2048 * BF16
    assert m.flops == 2 * (8 * per_expert + 2048 * 128)
    dense = bf.layer_cost(LLAMA, 1, 0, 1, BF16)
    # a decode step at no context reads each weight of the layer once
    assert dense.bytes - LLAMA.layer_params * BF16 == pytest.approx(6 * 4096 * BF16, rel=0.5)
    sparse = bf.layer_cost(QWEN, 1, 0, 1, BF16, active_experts=8)
    assert sparse.bytes < QWEN.layer_params * BF16 / 10  # 8 of 128 experts


def test_model_cost_at_batch_one() -> None:
    decode = bf.model_cost(LLAMA, 1, 4096, 1, BF16)
    weights = (LLAMA.num_params - LLAMA.vocab_size * LLAMA.hidden_size) * BF16
    kv = 32 * 2 * 4097 * 8 * 128 * BF16
    extra = decode.bytes - weights - kv
    assert 0 < extra < 2 << 20  # activations, the embedding row and the logits
    verify = bf.model_cost(LLAMA, 1, 4096, 5, BF16)
    # the floor of a 5-token verify is within 1% of the decode floor: both read the weights
    bw, rate = 3.0e12, 9.0e14
    assert decode.bound(bw, rate) == verify.bound(bw, rate) == "memory"
    assert 1.0 < verify.floor_s(bw, rate) / decode.floor_s(bw, rate) < 1.01


def test_rows_and_acceptance(capsys: pytest.CaptureFixture[str]) -> None:
    dev = bs.Device("test", bandwidth=1e12, matmul_rate=1e15)
    cost = bf.Cost(bytes=1e9, flops=1e9)
    decode = bs.make_row(dev, "model", LLAMA, 1, 1, 4096, 1.2, cost, True, eager_ms=2.0)
    assert decode.floor_ms == pytest.approx(1.0) and decode.ratio == pytest.approx(1.2)
    verify = bs.make_row(dev, "model", LLAMA, 1, 5, 4096, 1.35, cost, True)
    out = capsys.readouterr().out
    assert "x 1.20  graph (eager 2000.0 us)" in out and "floor     1000.0 us (memory )" in out
    lines = bk.acceptance([decode, verify], 5)
    assert lines[0].endswith(": met") and "x1.20" in lines[0]
    assert lines[1].endswith(": MISSED") and "x1.125" in lines[1]
    assert bk.acceptance([], 5) == []


def test_arguments() -> None:
    args = build_parser().parse_args(
        ["bench-kernels", "--shapes", "llama8b", "--batch-sizes", "1,8", "--parts", "model"]
    )
    assert args.shapes == ["llama8b"] and args.batch_sizes == [1, 8]
    assert args.parts == ["model"] and args.context == 4096 and args.verify_tokens == 5
    assert args.model_shape == "llama8b" and args.model_batch_sizes == [1]
    defaults = build_parser().parse_args(["bench-kernels"])
    assert defaults.shapes == ["llama8b", "qwen3moe"] and defaults.parts == list(bk.PARTS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "llama70b"], "unknown shape 'llama70b'; choices: llama8b, qwen3moe"),
        (["--batch-sizes", "1,0"], "batch sizes must be integers >= 1"),
        (["--batch-sizes", "a"], "batch sizes must be comma-separated integers"),
        (["--parts", "attention,gemm"], "unknown part 'gemm'; choices: attention, moe"),
        (["--verify-tokens", "40"], "--verify-tokens must be in [2, 33], got 40"),
        (["--context", "0"], "--context must be >= 1, got 0"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-kernels", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("outrider: error: ") and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_needs_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-kernels", "--parts", "model"]) == 2
    assert capsys.readouterr().err == "outrider: error: bench-kernels needs a CUDA device\n"


def test_every_part_runs_at_tiny_shapes_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU code path end to end at tiny shapes (torch backends, eager, CPU timers)."""
    import argparse

    shapes = {
        name: {**cfg, **{k: v for k, v in SMALL.items() if k in cfg}}
        for name, cfg in SHAPES.items()
    }
    args = argparse.Namespace(
        shapes=["llama8b", "qwen3moe"], batch_sizes=[1, 3], context=20, verify_tokens=5,
        parts=list(bk.PARTS), model_shape="llama8b", model_batch_sizes=[1, 2], seed=0,
    )  # fmt: skip
    dev = bs.Device("cpu", bandwidth=1e10, matmul_rate=1e11, device=torch.device("cpu"))
    rows = bk.run_parts(dev, shapes, args, "torch", "torch")
    kinds = [(r.part, r.shape, r.batch, r.query_len) for r in rows]
    attention = [(b, q) for b in (1, 3) for q in (1, 5)]
    assert kinds == (
        [("attention", "llama8b", b, q) for b, q in attention]
        + [("layer", "llama8b", b, q) for b, q in attention]
        + [("attention", "qwen3moe", b, q) for b, q in attention]
        + [("moe", "qwen3moe", t, 1) for t in (1, 3, 5, 15)]
        + [("layer", "qwen3moe", b, q) for b, q in attention]
        + [("model", "llama8b", b, q) for b in (1, 2) for q in (1, 5)]
    )
    for r in rows:
        assert r.ms > 0 and r.floor_ms > 0 and r.ratio == pytest.approx(r.ms / r.floor_ms)
        assert not r.graph
    small = bf.ModelShape.from_config("llama8b", shapes["llama8b"])
    model_rows = [r for r in rows if r.part == "model"]
    assert model_rows[0].bytes == bf.model_cost(small, 1, 20, 1, 2).bytes
    assert all(r.eager_ms is not None and r.eager_ms > 0 for r in model_rows)
    out = capsys.readouterr().out
    assert "verify 5 / decode 1: x" in out and "experts hit, torch" in out
    assert len(bk.acceptance(rows, 5)) == 2
