"""Tensor-parallel linear layers in vLLM's vocabulary.

Every parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that takes the
full checkpoint tensor and copies this rank's slice into place, so tensor parallelism only
changes the group setup, never the loading code.

- ``ColumnParallelLinear`` splits the output dim; each rank keeps its slice of the output.
- ``MergedColumnParallelLinear`` stacks several column layers (gate_up); shard_id = index.
- ``QKVParallelLinear`` stacks q, k, v heads; shard_id in {"q", "k", "v"}. KV heads are
  replicated when there are fewer of them than TP ranks.
- ``RowParallelLinear`` splits the input dim and all-reduces the partial outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from outrider.kernels import linear as cpu_linear
from outrider.kernels.fused import skinny_table
from outrider.workers.distributed import get_tp_group


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint "
            f"{tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    part = t.shape[dim] // size
    return t.narrow(dim, rank * part, part)


def _new_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class LinearBase(nn.Module):
    """Holds ``weight [out_local, in_local]`` and an optional ``bias [out_local]``."""

    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.input_size = input_size
        self.output_size = output_size
        self.weight = _new_param(output_size, input_size)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _new_param(output_size)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        default_weight_loader(param, loaded_weight)

    # NOTE: weights are frozen once loaded; the CPU packed copy is built on first use, and code
    # that changes a weight afterwards must call invalidate_packed() (the loader does).
    _packed: torch.Tensor | None = None

    def invalidate_packed(self) -> None:
        self._packed = None

    # NOTE: True where the local product is a partial sum that the TP group all-reduces.
    reduces_output = False

    def skinny_config(
        self, x: torch.Tensor, prologue: skinny_table.Prologue
    ) -> skinny_table.SkinnyConfig | None:
        """Tiles of the skinny GEMM when it runs this call with this prologue (host-side only)."""
        if x.requires_grad:
            return None
        return skinny_table.plan(x, self.weight, prologue)

    def fused_forward(
        self,
        x: torch.Tensor,
        config: skinny_table.SkinnyConfig,
        prologue: skinny_table.Prologue,
        *,
        norm_weight: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        eps: float = 1e-6,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward(prologue(x))`` in one skinny GEMM launch (plus the TP all-reduce)."""
        from outrider.kernels.fused import skinny_gemm as skinny  # NOTE: imports Triton

        reduce = self.reduces_output
        out, res = skinny.skinny_gemm(
            x,
            self.weight,
            None if reduce else self.bias,
            prologue=prologue,
            norm_weight=norm_weight,
            residual=residual,
            eps=eps,
            config=config,
        )  # [M, N]
        if reduce:
            out = get_tp_group().all_reduce(out)
            if self.bias is not None:
                out = out + self.bias
        return out, res

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = self.weight
        cfg = self.skinny_config(x, "none")
        if cfg is not None:
            from outrider.kernels.fused import skinny_gemm as skinny  # NOTE: imports Triton

            return skinny.skinny_gemm(x, w, bias, config=cfg)[0]
        if x.requires_grad or not cpu_linear.can_pack(w) or x.dtype != w.dtype:
            return F.linear(x, w, bias)
        if self._packed is None:
            self._packed = cpu_linear.pack_weight(w)
        return cpu_linear.packed_linear(x, self._packed, bias, w.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)


def invalidate_packed_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.invalidate_packed()


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight (e.g. an MoE router)."""


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp_size = get_tp_group().size
        if output_size % tp_size:
            raise ValueError(f"output size {output_size} is not divisible by TP size {tp_size}")
        super().__init__(input_size, output_size // tp_size, bias)
        self.total_output_size = output_size

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        default_weight_loader(param, _shard(loaded_weight, 0, self.tp_rank, self.tp_size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is None:
            # NOTE: an already-merged checkpoint tensor: split per sub-layer, then shard each.
            parts = loaded_weight.split(self.output_sizes, dim=0)
            for i, part in enumerate(parts):
                self.weight_loader(param, part, i)
            return
        assert isinstance(shard_id, int)
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        default_weight_loader(
            param.data.narrow(0, offset, size),
            _shard(loaded_weight, 0, self.tp_rank, self.tp_size),
        )


class QKVParallelLinear(ColumnParallelLinear):
    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
    ) -> None:
        tp_size = get_tp_group().size
        if total_num_heads % tp_size:
            raise ValueError(f"{total_num_heads} heads are not divisible by TP size {tp_size}")
        if total_num_kv_heads % tp_size and tp_size % total_num_kv_heads:
            raise ValueError(f"{total_num_kv_heads} KV heads do not split over TP size {tp_size}")
        self.head_size = head_size
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)
        # NOTE: with fewer KV heads than ranks each KV head lives on tp_size // nKV ranks.
        self.kv_replicas = max(1, tp_size // total_num_kv_heads)
        out_total = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp_size
        super().__init__(hidden_size, out_total, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is None:
            raise ValueError("QKVParallelLinear loads q, k and v separately")
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, rank = self.kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        src = loaded_weight.narrow(0, rank * size, size)
        default_weight_loader(param.data.narrow(0, offset, size), src)


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp_size = get_tp_group().size
        if input_size % tp_size:
            raise ValueError(f"input size {input_size} is not divisible by TP size {tp_size}")
        super().__init__(input_size // tp_size, output_size, bias)
        self.reduces_output = self.tp_size > 1

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if param.dim() == 2:
            loaded_weight = _shard(loaded_weight, 1, self.tp_rank, self.tp_size)
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._linear(x, self.bias)
        # NOTE: the bias is added once, after the reduction.
        out = get_tp_group().all_reduce(self._linear(x, None))  # [T, out]
        return out if self.bias is None else out + self.bias
