"""Fused layer kernels (residual add + RMSNorm, per-head RMSNorm, rotary on q and k, SiLU·up)
against their torch references, and the layers routed through them.

On the device machine: ``python -m pytest -m gpu tests/gpu/test_fused_layers.py -q -rP``.
Without a GPU: ``OUTRIDER_TRITON_INTERPRET=1 python -m pytest tests/gpu/test_fused_layers.py -q``
runs the same checks at small shapes on CPU tensors through the Triton interpreter, with the
layers forced onto the kernels by ``fused_on_cpu()``.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

# NOTE: tests/gpu/conftest.py switches Triton to its interpreter first when this is set.
INTERPRET = os.environ.get("OUTRIDER_TRITON_INTERPRET") == "1"


from outrider.kernels.fused import activation as fused_activation  # noqa: E402
from outrider.kernels.fused import norm as fused_norm  # noqa: E402
from outrider.kernels.fused import rotary as fused_rotary  # noqa: E402
from outrider.kernels.fused.dispatch import fused_on_cpu  # noqa: E402
from outrider.workers.layers.activation import SiluAndMul  # noqa: E402
from outrider.workers.layers.norm import RMSNorm  # noqa: E402
from outrider.workers.layers.rotary import RotaryEmbedding  # noqa: E402

pytestmark = [] if INTERPRET else [pytest.mark.gpu]
DEVICE = "cpu" if INTERPRET else "cuda"
# NOTE: the interpreter keeps bfloat16 as raw bits (docs/gpu-testing.md): GPU only.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
# Relative bound per element: 3 units of the dtype's last place (two roundings that may each
# land one unit apart from torch's), float32 loosened for reduction order and approximate exp.
RTOL = {torch.float32: 1e-5, torch.float16: 3 * 2.0**-10, torch.bfloat16: 3 * 2.0**-7}
ATOL = 1e-6

if INTERPRET:
    NORM_SHAPES = [(1, 64), (7, 200), (33, 48)]  # (T, H)
    HEAD_SHAPES = [(1, 4, 32), (5, 3, 16), (9, 2, 20)]  # (T, nH, hd)
    ROPE_SHAPES = [(1, 4, 2, 16), (9, 4, 1, 32), (5, 3, 3, 20)]  # (T, nH, nKV, hd)
    ACT_SHAPES = [(1, 40), (6, 1500), (3, 7)]  # (T, I)
else:
    NORM_SHAPES = [(1, 4096), (8, 4096), (64, 4096), (300, 5120), (4096, 4096), (5, 1000)]
    HEAD_SHAPES = [(1, 32, 128), (64, 32, 128), (8, 8, 128), (300, 16, 64), (7, 40, 96)]
    ROPE_SHAPES = [
        (1, 32, 8, 128),
        (8, 32, 8, 128),
        (300, 32, 8, 128),
        (2048, 32, 8, 128),
        (64, 16, 4, 64),
        (7, 40, 8, 96),
    ]
    ACT_SHAPES = [(1, 14336), (8, 14336), (64, 14336), (512, 14336), (3, 1000)]


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    # NOTE: each test id draws its own inputs; OUTRIDER_TEST_SEED draws a different set.
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("OUTRIDER_TEST_SEED", 0))
    print(f"seed {seed}")  # shown with a failure's captured output
    return torch.Generator().manual_seed(seed)


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)


def poison_allocator(like: torch.Tensor) -> None:
    """Free a NaN block of ``like``'s size, which the CUDA caching allocator tends to hand to
    the next output of that size: an element the kernel never writes then stays NaN."""
    if like.is_cuda:
        del_me = torch.full_like(like, float("nan"))
        del del_me


def check_close(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.dtype)
    assert out.is_contiguous()
    assert bool(torch.isfinite(out).all()), f"{name}: non-finite output"
    o, r = out.double(), ref.double()
    err = (o - r).abs()
    bound = RTOL[ref.dtype] * r.abs() + ATOL
    worst = float((err / (r.abs() + ATOL)).max()) if err.numel() else 0.0
    same = float((out == ref).float().mean()) if out.numel() else 1.0
    print(f"{name}: worst relative error {worst:.2e}, bit-identical {100 * same:.2f}%")
    assert bool((err <= bound).all()), f"{name}: error {worst:.2e} over {RTOL[ref.dtype]:.1e}"


# --- RMSNorm ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_fused_add_rms_norm(shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator):
    t, h = shape
    x, residual = rand(gen, t, h, dtype=dtype), rand(gen, t, h, dtype=dtype, scale=4.0)
    weight = rand(gen, h, dtype=dtype)
    ref, ref_res = fused_norm.fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    poison_allocator(ref)
    out, res = fused_norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    # NOTE: the new residual is one rounded sum, as in torch: bit for bit.
    assert torch.equal(res, ref_res)
    check_close(out, ref, "fused_add_rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_rms_norm(shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator) -> None:
    t, h = shape
    x = rand(gen, t, h, dtype=dtype, scale=3.0)
    weight = rand(gen, h, dtype=dtype)
    ref = fused_norm.rms_norm_ref(x, weight, 1e-5)
    poison_allocator(ref)
    check_close(fused_norm.rms_norm(x, weight, 1e-5), ref, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=str)
def test_per_head_rms_norm_on_qkv_slices(
    shape: tuple[int, int, int], dtype: torch.dtype, gen: torch.Generator
) -> None:
    """Qwen3's q/k norm: ``[T, nH, hd]`` views of q and k inside the fused qkv rows."""
    t, nh, hd = shape
    nkv = max(1, nh // 4)
    qkv = rand(gen, t, (nh + 2 * nkv) * hd, dtype=dtype, scale=2.0)
    q, k, _ = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    weight = rand(gen, hd, dtype=dtype)
    for part, n in ((q, nh), (k, nkv)):
        heads = part.reshape(t, n, hd)
        assert not heads.is_contiguous() or t == 1
        ref = fused_norm.rms_norm_ref(heads, weight, 1e-6)
        poison_allocator(ref)
        check_close(fused_norm.rms_norm(heads, weight, 1e-6), ref, "per-head rms_norm")


def test_fused_add_rms_norm_3d(gen: torch.Generator) -> None:
    """A 3-D residual stream is normalised over its last dimension, row by row."""
    x, residual = rand(gen, 3, 4, 40, dtype=torch.float16), rand(gen, 3, 4, 40, dtype=torch.float16)
    weight = rand(gen, 40, dtype=torch.float16)
    ref, ref_res = fused_norm.fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    out, res = fused_norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(res, ref_res)
    check_close(out, ref, "fused_add_rms_norm 3-D")


def test_rms_norm_float32_weight_promotes(gen: torch.Generator) -> None:
    """A float32 weight on half inputs gives a float32 output, as ``weight * normed`` does."""
    x = rand(gen, 5, 96, dtype=torch.float16)
    weight = rand(gen, 96, dtype=torch.float32)
    ref = fused_norm.rms_norm_ref(x, weight, 1e-6)
    out = fused_norm.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    # NOTE: the float32 product of the same fp16-rounded row; only that rounding may flip.
    torch.testing.assert_close(out, ref, rtol=RTOL[torch.float16], atol=ATOL)


# --- rotary -------------------------------------------------------------------------------


MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def rope_table(head_dim: int, max_position: int) -> RotaryEmbedding:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return RotaryEmbedding(head_dim, max_position, 500000.0, scaling).to(DEVICE)


def rotary_magnitude(
    positions: torch.Tensor, x: torch.Tensor, rope: RotaryEmbedding
) -> torch.Tensor:
    """|x1·cos| + |x2·sin| and |x2·cos| + |x1·sin| per element (float32): the size of the
    products whose rounding a rotated element carries."""
    cos = rope.cos_cache.abs()
    sin = rope.sin_cache.abs()
    xa = x.float().abs()
    plus_first, _ = fused_rotary.rotary_ref(positions, xa, xa, cos, -sin)  # first halves
    plus_second, _ = fused_rotary.rotary_ref(positions, xa, xa, cos, sin)  # second halves
    half = cos.shape[-1]
    first = (torch.arange(x.shape[-1], device=x.device) % (2 * half)) < half
    return torch.where(first, plus_first, plus_second)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of dtype at |x| (float32)."""
    e = torch.frexp(x.float()).exponent
    one = torch.ones_like(x, dtype=torch.float32)
    return torch.ldexp(one, e - 1 - MANTISSA_BITS[dtype]).clamp_min(torch.finfo(dtype).tiny)


def check_rotary(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, name: str) -> None:
    if out.dtype == torch.float32:
        # NOTE: float32 products may be contracted into the sum (FMA): not bit for bit.
        check_close(out, ref, name)
        return
    assert out.is_contiguous() and out.dtype == ref.dtype
    mismatch = (out != ref).sum().item()
    # NOTE: the kernel spells out the reference's roundings of each product, but the GPU
    # compiler may fold them (an FMA): the two results may then differ by the products'
    # rounding, one unit at the products' size (many units of a cancelling sum), plus the final
    # rounding. The interpreter is exact.
    bound = ulp(mag, out.dtype) + ulp(ref, out.dtype)
    err = (out.float() - ref.float()).abs()
    worst = (err / bound).max().item()
    print(f"{name}: {mismatch} of {out.numel()} elements differ; worst {worst:.2f} of the bound")
    assert worst <= 1.0, f"{name}: {mismatch} elements differ, worst {worst:.2f} of the bound"


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
def test_rotary_on_qkv_slices(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    pos_dtype: torch.dtype,
    gen: torch.Generator,
) -> None:
    t, nh, nkv, hd = shape
    rope = rope_table(hd, 4096)
    qkv = rand(gen, t, (nh + 2 * nkv) * hd, dtype=dtype, scale=2.0)
    v_before = qkv[:, (nh + nkv) * hd :].clone()
    q, k, _ = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    positions = torch.randint(0, 4096, (t,), generator=gen).to(pos_dtype).to(DEVICE)
    ref_q, ref_k = fused_rotary.rotary_ref(positions, q, k, rope.cos_cache, rope.sin_cache)
    poison_allocator(ref_q)
    out_q, out_k = fused_rotary.apply_rotary(positions, q, k, rope.cos_cache, rope.sin_cache)
    check_rotary(out_q, ref_q, rotary_magnitude(positions, q, rope), "rotary q")
    check_rotary(out_k, ref_k, rotary_magnitude(positions, k, rope), "rotary k")
    assert torch.equal(qkv[:, (nh + nkv) * hd :], v_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_same_tensor_as_query_and_key(dtype: torch.dtype, gen: torch.Generator) -> None:
    """DFlash rotates its context keys as ``rotary_emb(positions, k, k)``."""
    t, n, hd = 6, 2, 32
    rope = rope_table(hd, 128)
    k = rand(gen, t, n * hd, dtype=dtype)
    positions = torch.randint(0, 128, (t,), generator=gen).to(DEVICE)
    ref_q, ref_k = fused_rotary.rotary_ref(positions, k, k, rope.cos_cache, rope.sin_cache)
    out_q, out_k = fused_rotary.apply_rotary(positions, k, k, rope.cos_cache, rope.sin_cache)
    mag = rotary_magnitude(positions, k, rope)
    check_rotary(out_q, ref_q, mag, "rotary q")
    check_rotary(out_k, ref_k, mag, "rotary k")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
def test_rotary_write_kv_matches_rotary_then_write_kv(
    shape: tuple[int, int, int, int], dtype: torch.dtype, gen: torch.Generator
) -> None:
    """One launch gives apply_rotary's query, and the cache holds exactly what apply_rotary's
    key and the value give through write_kv: the token's slot written, slots < 0 skipped, every
    other slot untouched."""
    from outrider.kernels.attention.torch_ref import write_kv

    t, nh, nkv, hd = shape
    rope = rope_table(hd, 4096)
    qkv = rand(gen, t, (nh + 2 * nkv) * hd, dtype=dtype, scale=2.0)
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    positions = torch.randint(0, 4096, (t,), generator=gen).to(DEVICE)
    block_size, num_blocks = 16, t // 8 + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.25] = -1  # padding tokens write nothing
    slots = slots.to(DEVICE)
    kc, vc = (rand(gen, num_blocks, block_size, nkv, hd, dtype=dtype) for _ in range(2))
    caches = [kc, vc, kc.clone(), vc.clone()]
    want_q, want_k = fused_rotary.apply_rotary(positions, q, k, rope.cos_cache, rope.sin_cache)
    write_kv(want_k.view(t, nkv, hd), v.reshape(t, nkv, hd), caches[0], caches[1], slots)
    got_q = fused_rotary.apply_rotary_write_kv(
        positions, q, k, v, rope.cos_cache, rope.sin_cache, caches[2], caches[3], slots
    )
    assert torch.equal(got_q, want_q)
    assert torch.equal(caches[2], caches[0]), "key cache"
    assert torch.equal(caches[3], caches[1]), "value cache"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
def test_rotary_write_kv_with_qk_norm(
    shape: tuple[int, int, int, int], dtype: torch.dtype, gen: torch.Generator
) -> None:
    """With Qwen3's per-head q/k RMSNorm weights the launch normalises each head first: the
    query and the cached key are the reference's (``rms_norm_ref`` per head, then
    ``rotary_ref``) up to one unit of the normalised input's rounding carried through the
    rotation (the launch sums each head's squares in two halves) plus the rotary kernel's own
    bound; the value is stored as it is."""
    from outrider.kernels.attention.torch_ref import write_kv

    t, nh, nkv, hd = shape
    rope = rope_table(hd, 4096)
    qkv = rand(gen, t, (nh + 2 * nkv) * hd, dtype=dtype, scale=2.0)
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    wq = (1.0 + 0.3 * torch.randn(hd, generator=gen)).to(dtype).to(DEVICE)
    wk = (1.0 + 0.3 * torch.randn(hd, generator=gen)).to(dtype).to(DEVICE)
    eps = 1e-6
    positions = torch.randint(0, 4096, (t,), generator=gen).to(DEVICE)
    block_size, num_blocks = 16, t // 8 + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t].to(DEVICE)
    kc, vc = (rand(gen, num_blocks, block_size, nkv, hd, dtype=dtype) for _ in range(2))
    want_k, want_v, got_k, got_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    qn = fused_norm.rms_norm_ref(q.reshape(t, nh, hd), wq, eps).view(t, -1)
    kn = fused_norm.rms_norm_ref(k.reshape(t, nkv, hd), wk, eps).view(t, -1)
    ref_q, ref_k = fused_rotary.rotary_ref(positions, qn, kn, rope.cos_cache, rope.sin_cache)
    write_kv(ref_k.view(t, nkv, hd), v.reshape(t, nkv, hd), want_k, want_v, slots)
    got_q = fused_rotary.apply_rotary_write_kv(
        positions, q, k, v, rope.cos_cache, rope.sin_cache, got_k, got_v, slots,
        q_norm_weight=wq, k_norm_weight=wk, eps=eps,
    )  # fmt: skip
    assert torch.equal(got_v, want_v), "value cache"
    for name, got, ref, x in (
        ("q", got_q, ref_q, qn),
        ("k", got_k.view(-1, nkv * hd)[slots], ref_k, kn),
    ):
        if dtype == torch.float32:
            check_close(got, ref, f"normed rotary {name}")
            continue
        mag = rotary_magnitude(positions, x, rope)
        bound = 2 * ulp(mag, dtype) + ulp(ref, dtype)
        worst = ((got.float() - ref.float()).abs() / bound).max().item()
        print(f"normed rotary {name}: worst {worst:.2f} of the bound")
        assert worst <= 1.0, f"normed rotary {name}: worst {worst:.2f} of the bound"
    with pytest.raises(ValueError, match="q_norm_weight"):
        fused_rotary.apply_rotary_write_kv(
            positions, q, k, v, rope.cos_cache, rope.sin_cache, got_k, got_v, slots,
            q_norm_weight=wq[:-1], k_norm_weight=wk,
        )  # fmt: skip


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_layer_writes_kv_in_the_rotary_launch(
    dtype: torch.dtype, qk_norm: bool, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attention.forward_rotary with the rotary launch storing K/V equals the rotary launch
    followed by the backend's own write and attend (OUTRIDER_ROTARY_WRITES_KV=0): the same
    caches and the same output, bit for bit; slots of other tokens stay untouched. With Qwen3's
    q/k norm, the first takes the norms into the rotary launch and the second runs them as
    RMSNorm layers first: equal within check_close (the two sum the squares differently)."""
    from outrider.kernels.attention.metadata import AttentionMetadata
    from outrider.kernels.attention.torch_ref import TorchAttentionBackend
    from outrider.workers.forward_context import ForwardContext, forward_context
    from outrider.workers.layers import attention as attention_layer
    from outrider.workers.layers.attention import Attention
    from outrider.workers.layers.norm import RMSNorm

    nh, nkv, hd, block_size = 4, 2, 16, 16
    ctx_lens, q_lens = [5, 0, 20], [1, 3, 2]
    t = sum(q_lens)
    qkv = rand(gen, t, (nh + 2 * nkv) * hd, dtype=dtype)
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens, strict=True)]
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx_lens, q_lens, strict=True)])
    tables = torch.arange(6).view(3, 2)  # two blocks per sequence
    slots = torch.tensor(
        [
            int(tables[b, p // block_size]) * block_size + p % block_size
            for b in range(len(q_lens))
            for p in range(ctx_lens[b], seq_lens[b])
        ]
    )
    starts = torch.tensor([0] + q_lens).cumsum(0)
    md = AttentionMetadata(
        slot_mapping=slots.to(DEVICE),
        query_start_loc=starts.to(DEVICE),
        seq_lens=torch.tensor(seq_lens).to(DEVICE),
        block_tables=tables.to(DEVICE),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens,
    )
    layer = Attention(nh, hd, nkv, scale=hd**-0.5, layer_idx=0)
    history = rand(gen, 2, 6, block_size, nkv, hd, dtype=dtype)
    norms = None
    if qk_norm:
        norms = (RMSNorm(hd, eps=1e-6).to(DEVICE, dtype), RMSNorm(hd, eps=1e-6).to(DEVICE, dtype))
        for n in norms:
            n.weight.copy_(1.0 + 0.3 * torch.randn(hd, generator=gen))
    outs, caches = [], []
    for writes in ("1", "0"):
        monkeypatch.setenv("OUTRIDER_ROTARY_WRITES_KV", writes)
        rope = rope_table(hd, 256).to(DEVICE)  # NOTE: reads the switch when built
        kv = [(history[0].clone(), history[1].clone())]
        with forward_context(ForwardContext(md, kv, TorchAttentionBackend())), on_kernels():
            assert rope.writes_kv(q, k, kv[0][0]) == (writes == "1")
            if norms is not None:
                assert attention_layer._norms_fit(norms, q, hd)
            outs.append(layer.forward_rotary(positions.to(DEVICE), q, k, v, rope, norms))
        caches.append(kv[0])
    if qk_norm:
        check_close(caches[0][0], caches[1][0], "key cache")
        assert torch.equal(caches[0][1], caches[1][1]), "value cache"
        check_close(outs[0], outs[1], "attention output")
        return
    assert torch.equal(caches[0][0], caches[1][0]), "key cache"
    assert torch.equal(caches[0][1], caches[1][1]), "value cache"
    others = torch.ones(history[0].numel() // (nkv * hd), dtype=torch.bool)
    others[slots] = False
    kc = caches[0][0].view(-1, nkv * hd)
    assert torch.equal(kc[others.to(DEVICE)], history[0].view(-1, nkv * hd)[others.to(DEVICE)])
    assert not torch.equal(kc[slots.to(DEVICE)], history[0].view(-1, nkv * hd)[slots.to(DEVICE)])
    assert torch.equal(outs[0], outs[1])


# --- SiLU · up ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
def test_silu_and_mul(shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator) -> None:
    t, i = shape
    x = rand(gen, t, 2 * i, dtype=dtype, scale=3.0)
    ref = fused_activation.silu_and_mul_ref(x)
    poison_allocator(ref)
    check_close(fused_activation.silu_and_mul(x), ref, "silu_and_mul")


# --- the layers ---------------------------------------------------------------------------


@contextlib.contextmanager
def on_kernels() -> Iterator[None]:
    """Layers use the kernels: CUDA tensors always, CPU tensors only inside fused_on_cpu()."""
    with fused_on_cpu() if INTERPRET else contextlib.nullcontext():
        yield


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the launcher calls that the layers make (each call still runs the kernel)."""
    counts: dict[str, int] = {}

    def counted(module: Any, name: str) -> None:
        launcher: Callable[..., Any] = getattr(module, name)
        counts[name] = 0

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(fused_norm, "rms_norm")
    counted(fused_norm, "fused_add_rms_norm")
    counted(fused_rotary, "apply_rotary")
    counted(fused_activation, "silu_and_mul")
    return counts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layers_use_the_kernels(
    dtype: torch.dtype, gen: torch.Generator, calls: dict[str, int]
) -> None:
    """RMSNorm (with residual, plain, per head), RotaryEmbedding and SiluAndMul route through
    the kernels and agree with their own torch code."""
    t, h, nh, nkv, hd = 5, 64, 4, 2, 16
    norm = RMSNorm(h, eps=1e-6).to(DEVICE, dtype)
    head_norm = RMSNorm(hd, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(rand(gen, h, dtype=dtype))
        head_norm.weight.copy_(rand(gen, hd, dtype=dtype))
    rope = rope_table(hd, 256).to(DEVICE)
    x, residual = rand(gen, t, h, dtype=dtype), rand(gen, t, h, dtype=dtype)
    qkv = rand(gen, t, (nh + 2 * nkv) * hd, dtype=dtype)
    q, k, _ = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    positions = torch.randint(0, 256, (t,), generator=gen).to(DEVICE)
    gate_up = rand(gen, t, 2 * 48, dtype=dtype, scale=3.0)

    def run_layers() -> list[torch.Tensor]:
        out, res = norm(x, residual)
        heads = head_norm(q.reshape(t, nh, hd)).view(t, nh * hd)
        rq, rk = rope(positions, q, k)
        return [out, res, norm(x), heads, rq, rk, SiluAndMul()(gate_up)]

    with on_kernels():
        fused = run_layers()
    assert calls == {"rms_norm": 2, "fused_add_rms_norm": 1, "apply_rotary": 1, "silu_and_mul": 1}
    with torch_layers():
        ref = run_layers()
    names = ["add+norm", "new residual", "norm", "q norm", "rotary q", "rotary k", "silu*up"]
    for name, o, r in zip(names, fused, ref, strict=True):
        if name.startswith("rotary"):
            check_rotary(
                o, r, rotary_magnitude(positions, q if name == "rotary q" else k, rope), name
            )
        elif name == "new residual":
            assert torch.equal(o, r)
        else:
            check_close(o, r, name)


@contextlib.contextmanager
def torch_layers() -> Iterator[None]:
    """The layers' own torch code, for CUDA tensors too (use_fused patched to False)."""
    import outrider.workers.layers.activation as act_mod
    import outrider.workers.layers.norm as norm_mod
    import outrider.workers.layers.rotary as rope_mod

    mods = (act_mod, norm_mod, rope_mod)
    saved = [m.use_fused for m in mods]
    for m in mods:
        m.use_fused = lambda x: False  # type: ignore[assignment]
    try:
        yield
    finally:
        for m, f in zip(mods, saved, strict=True):
            m.use_fused = f  # type: ignore[assignment]


def test_layers_keep_torch_code_where_unfused(gen: torch.Generator, calls: dict[str, int]):
    """float64, tensors that require grad and (outside fused_on_cpu) every CPU tensor never
    reach a kernel."""
    norm = RMSNorm(32).to(DEVICE, torch.float64)
    x = rand(gen, 3, 32, dtype=torch.float64)
    with on_kernels():
        norm(x, x)
        SiluAndMul()(x)
        grad = rand(gen, 3, 32, dtype=torch.float32).requires_grad_()
        RMSNorm(32).to(DEVICE)(grad).sum().backward()
        assert grad.grad is not None
    cpu = torch.randn(3, 32, generator=gen, dtype=torch.float16)
    RMSNorm(32).to(torch.float16)(cpu, cpu)
    SiluAndMul()(cpu)
    assert sum(calls.values()) == 0


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("t", [1, 8])
def test_cuda_graph_capture_replays_with_new_inputs(
    t: int, gen: torch.Generator, capture_step: Any
) -> None:
    """Norm, rotary and SiLU·up of one layer capture into a CUDA graph (no host sync) and
    replay exactly like eager calls on new inputs."""
    h, nh, nkv, hd, i = 4096, 32, 8, 128, 14336
    dtype = torch.bfloat16
    norm = RMSNorm(h).to(DEVICE, dtype)
    rope = rope_table(hd, 8192)
    x, residual = rand(gen, t, h, dtype=dtype), rand(gen, t, h, dtype=dtype)
    qkv = rand(gen, t, (nh + 2 * nkv) * hd, dtype=dtype)
    gate_up = rand(gen, t, 2 * i, dtype=dtype)
    positions = torch.randint(0, 8192, (t,), generator=gen).to(DEVICE)

    def step() -> tuple[torch.Tensor, ...]:
        out, res = norm(x, residual)
        q, k, _ = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        rq, rk = rope(positions, q, k)
        return out, res, rq, rk, SiluAndMul()(gate_up)

    graph, captured = capture_step(step)
    for _ in range(2):
        for buf in (x, residual, qkv, gate_up):
            buf.copy_(torch.randn(buf.shape, generator=gen).to(dtype))
        positions.copy_(torch.randint(0, 8192, (t,), generator=gen))
        graph.replay()
        for c, e in zip(captured, step(), strict=True):
            assert torch.equal(c, e)
