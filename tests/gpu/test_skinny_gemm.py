"""The skinny GEMM (kernels/fused/skinny_gemm.py) against its reference, with every prologue,
and the decoder layers routed through it.

On the device machine: ``python -m pytest -m gpu tests/gpu/test_skinny_gemm.py -q -rP``.
Without a GPU: ``OUTRIDER_TRITON_INTERPRET=1 python -m pytest tests/gpu/test_skinny_gemm.py -q``
runs the kernel checks at small shapes on CPU tensors through the Triton interpreter.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("OUTRIDER_TRITON_INTERPRET") == "1"

from outrider.kernels.fused import skinny_gemm as sg  # noqa: E402
from outrider.kernels.fused import skinny_table as st  # noqa: E402

pytestmark = [] if INTERPRET else [pytest.mark.gpu]
DEVICE = "cpu" if INTERPRET else "cuda"
# NOTE: the interpreter keeps bfloat16 as raw bits (docs/gpu-testing.md): GPU only.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
# ‖out − ref‖₂ / ‖ref‖₂ per row against a float64 product of the same rounded operands.
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

if INTERPRET:
    SHAPES = [(1, 24, 64), (3, 40, 96), (16, 16, 32), (5, 33, 80)]  # (M, N, K)
    CONFIGS = [st.SkinnyConfig(8, 32), st.SkinnyConfig(16, 64), st.SkinnyConfig(32, 32, 4, 2)]
else:
    SHAPES = [
        (1, 6144, 4096),
        (5, 6144, 4096),
        (8, 4096, 4096),
        (16, 28672, 4096),
        (1, 4096, 14336),
        (2, 128, 2048),
        (4, 1000, 200),
        (1, 151936, 2048),
    ]
    CONFIGS = [
        st.SkinnyConfig(16, 256, 4, 4),
        st.SkinnyConfig(32, 128, 4, 3),
        st.SkinnyConfig(8, 512, 4, 4),
        st.SkinnyConfig(64, 64, 8, 3),
    ]


def _gen(*parts: object) -> torch.Generator:
    seed = int(os.environ.get("OUTRIDER_TEST_SEED", "0"))
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(parts).encode()) + seed)
    return g


def _inputs(
    m: int, n: int, k: int, dtype: torch.dtype, prologue: str, bias: bool
) -> dict[str, torch.Tensor | None]:
    g = _gen(m, n, k, dtype, prologue, bias)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    cols = 2 * k if prologue == "silu_mul" else k
    return {
        "x": rand(m, cols),
        "weight": rand(n, k, scale=k**-0.5),
        "bias": rand(n) if bias else None,
        "norm_weight": rand(k, scale=0.5) + 1.0 if prologue in ("norm", "add_norm") else None,
        "residual": rand(m, k) if prologue == "add_norm" else None,
    }


def _ref64(inp: dict[str, torch.Tensor | None], prologue: str) -> tuple[torch.Tensor, ...]:
    """The prologue in the test dtype (the layers' torch code), the product in float64."""
    x, w, b = inp["x"], inp["weight"], inp["bias"]
    assert x is not None and w is not None
    a = x
    res = None
    if prologue == "norm":
        a = sg.rms_norm_ref(x, inp["norm_weight"], 1e-6)  # type: ignore[arg-type]
    elif prologue == "add_norm":
        a, res = sg.fused_add_rms_norm_ref(x, inp["residual"], inp["norm_weight"], 1e-6)  # type: ignore[arg-type]
    elif prologue == "silu_mul":
        a = sg.silu_and_mul_ref(x)
    out = a.double() @ w.double().T
    if b is not None:
        out = out + b.double()
    return (out,) if res is None else (out, res)


def _worst_row_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref).norm(dim=-1)
    return float((diff / ref.norm(dim=-1).clamp_min(1e-30)).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prologue", st.PROLOGUES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_skinny_gemm_matches_reference(
    shape: tuple[int, int, int], prologue: str, dtype: torch.dtype
) -> None:
    m, n, k = shape
    bias = n % 2 == 1
    inp = _inputs(m, n, k, dtype, prologue, bias)
    refs = _ref64(inp, prologue)
    for cfg in [None, *CONFIGS]:
        if cfg is not None and m > 1 and cfg.block_n < 16:
            continue  # NOTE: the tl.dot path takes 16-wide tiles (the launcher widens narrower)
        out, res = sg.skinny_gemm(
            inp["x"],  # type: ignore[arg-type]
            inp["weight"],  # type: ignore[arg-type]
            inp["bias"],
            prologue=prologue,  # type: ignore[arg-type]
            norm_weight=inp["norm_weight"],
            residual=inp["residual"],
            eps=1e-6,
            config=cfg,
        )
        assert out.shape == (m, n) and out.dtype == dtype
        assert bool(torch.isfinite(out).all()), f"{cfg}: non-finite output"
        err = _worst_row_error(out, refs[0])
        print(f"{shape} {prologue} {dtype} {cfg}: worst row error {err:.2e}")
        assert err <= BOUND[dtype], f"{cfg}: worst row error {err:.3e} > {BOUND[dtype]}"
        if prologue == "add_norm":
            assert res is not None and torch.equal(res, refs[1]), "new residual differs"
        else:
            assert res is None


def test_skinny_gemm_rejects_bad_calls() -> None:
    x = torch.randn(2, 32, device=DEVICE)
    w = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="`prologue` must be one of"):
        sg.skinny_gemm(x, w, prologue="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most 16 rows"):
        sg.skinny_gemm(torch.randn(17, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="must have 64 columns"):
        sg.skinny_gemm(x, w, prologue="silu_mul")
    with pytest.raises(ValueError, match="`norm_weight` must be"):
        sg.skinny_gemm(x, w, prologue="norm")
    with pytest.raises(ValueError, match="`residual` must be"):
        sg.skinny_gemm(x, w, prologue="add_norm", norm_weight=torch.ones(32, device=DEVICE))


def test_row_buckets_and_keys() -> None:
    assert [st.row_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert st.table_key("none", 5, 6144, 4096) == "none:8:6144:4096"
    assert st.device_slug("NVIDIA H200") == "nvidia_h200"


# -- the layers routed through it ----------------------------------------------------------------
LAYER_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


def _layer_ctx():  # type: ignore[no-untyped-def]
    import contextlib

    from outrider.kernels.fused.dispatch import fused_on_cpu

    return fused_on_cpu() if INTERPRET else contextlib.nullcontext()


@pytest.mark.parametrize("dtype", LAYER_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("with_residual", [False, True])
def test_decoder_mlp_and_qkv_through_skinny(
    dtype: torch.dtype, rows: int, with_residual: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LlamaMLP.forward_normed`` and ``norm_linear`` on q/k/v take the fused launches (one per
    projection) and agree with the modules run one after the other."""
    from outrider.workers.layers.fused_linear import norm_linear
    from outrider.workers.layers.linear import QKVParallelLinear
    from outrider.workers.layers.norm import RMSNorm
    from outrider.workers.models.llama import LlamaMLP

    hidden, inter = (64, 96) if INTERPRET else (4096, 14336)
    g = _gen("layers", dtype, rows, with_residual)
    mlp = LlamaMLP(hidden, inter)
    qkv = QKVParallelLinear(hidden, 16, hidden // 16, 2)
    norm = RMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        for p in [*mlp.parameters(), *qkv.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        norm.weight.copy_(1.0 + 0.3 * torch.randn(hidden, generator=g))
    for mod in (mlp, qkv, norm):
        mod.to(device=DEVICE, dtype=dtype)
    x = torch.randn(rows, hidden, generator=g).to(device=DEVICE, dtype=dtype)
    res = torch.randn(rows, hidden, generator=g).to(device=DEVICE, dtype=dtype)
    residual = res if with_residual else None

    with _layer_ctx():
        want_mlp, want_res = mlp.forward_normed(x, residual, norm)
        want_qkv, _ = norm_linear(norm, qkv, x, residual)
        calls: list[str] = []
        real = sg.skinny_gemm

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(kwargs.get("prologue", "none"))
            return real(*args, **kwargs)

        monkeypatch.setattr(sg, "skinny_gemm", counting)
        with st.forced(st.SkinnyConfig(16, 32 if INTERPRET else 256)):
            got_mlp, got_res = mlp.forward_normed(x, residual, norm)
            got_qkv, got_qkv_res = norm_linear(norm, qkv, x, residual)
    prologue = "add_norm" if with_residual else "norm"
    assert calls == [prologue, "silu_mul", prologue], calls
    assert torch.equal(got_res, want_res) and torch.equal(got_qkv_res, want_res)
    for got, want in ((got_mlp, want_mlp), (got_qkv, want_qkv)):
        err = _worst_row_error(got, want.double())
        assert err <= 2 * BOUND[dtype], f"worst row error {err:.3e}"
