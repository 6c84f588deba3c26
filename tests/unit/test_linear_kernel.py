from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from outrider.kernels import linear as cpu_linear


@pytest.mark.skipif(not cpu_linear.ENABLED, reason="oneDNN packed linear not available")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m", [1, 3, 8, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_reference(
    dtype: torch.dtype, tol: float, m: int, bias: bool
) -> None:
    torch.manual_seed(m)
    w = torch.randn(96, 64, dtype=dtype)
    b = torch.randn(96, dtype=dtype) if bias else None
    x = torch.randn(m, 64, dtype=dtype)
    out = cpu_linear.packed_linear(x, cpu_linear.pack_weight(w), b, 96)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    err = (out.double() - ref).norm() / ref.norm()
    assert err < tol, err


def test_layer_repacks_after_weight_change() -> None:
    from outrider.workers.layers.linear import ReplicatedLinear, invalidate_packed_weights

    torch.manual_seed(0)
    layer = ReplicatedLinear(16, 8, bias=False)
    layer.weight.data.copy_(torch.randn(8, 16))
    x = torch.randn(2, 16)
    w1 = layer.weight.detach().clone()
    with torch.inference_mode():
        first = layer(x)
        layer.weight.data.copy_(torch.randn(8, 16))
        invalidate_packed_weights(layer)
        second = layer(x)
    torch.testing.assert_close(first, F.linear(x, w1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
