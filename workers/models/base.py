"""The interface every model shares: pipeline-stage outputs and the decoder-only skeleton.

A model is built for one pipeline stage, the contiguous layer range ``[start_layer,
end_layer)``: the embedding lives on the first stage, the final norm and LM head on the last.
Layers outside the range are ``PPMissingLayer`` placeholders so that parameter names keep their
global layer index and match the checkpoint.

Aux hidden states (EAGLE-3 / DFlash capture, vLLM's convention): id k is the input to decoder
layer k, i.e. the residual stream ``hidden + residual`` before layer k; id 0 is the embedding
output and id N (= num_hidden_layers) the output of the last layer before the final norm. For
0 < k < N this equals HF's ``output_hidden_states[k]``. Each stage captures the ids of the
layers it holds, and the last stage also captures id N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from outrider.workers.layers.norm import RMSNorm
from outrider.workers.layers.vocab import VocabParallelEmbedding


class ModelLoadError(ValueError):
    """A model path, config or checkpoint cannot be loaded; the message names what is wrong."""


@dataclass
class IntermediateTensors:
    """What a non-last pipeline stage hands to the next one."""

    hidden_states: torch.Tensor  # [T, H]
    residual: torch.Tensor | None  # [T, H]


@dataclass
class ModelOutput:
    hidden_states: torch.Tensor | None  # [T, H] after the final norm; None before the last stage
    intermediate: IntermediateTensors | None = None  # set on every stage but the last
    aux_hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> [T, H]


class PPMissingLayer(nn.Identity):
    """Stands in for a layer that another pipeline stage holds."""


def stage_range(num_layers: int, start_layer: int, end_layer: int | None) -> tuple[int, int]:
    end = num_layers if end_layer is None else end_layer
    if not 0 <= start_layer < end <= num_layers:
        raise ValueError(
            f"invalid layer range [{start_layer}, {end}) for a model with {num_layers} layers"
        )
    return start_layer, end


# (global layer index, local layer index) -> decoder layer
LayerFactory = Callable[[int, int], nn.Module]


class DecoderModel(nn.Module):
    """Embedding → this stage's decoder layers → final norm, with aux hidden-state capture.

    Each decoder layer is called as ``layer(positions, hidden, residual) -> (hidden, residual)``
    with vLLM's deferred residual add: the stream after a layer is ``hidden + residual``.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        rms_norm_eps: float,
        start_layer: int,
        end_layer: int,
        make_layer: LayerFactory,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.start_layer, self.end_layer = start_layer, end_layer
        self.is_first = start_layer == 0
        self.is_last = end_layer == num_layers
        self.embed_tokens = (
            VocabParallelEmbedding(vocab_size, hidden_size) if self.is_first else None
        )
        self.layers = nn.ModuleList(
            make_layer(i, i - start_layer) if start_layer <= i < end_layer else PPMissingLayer()
            for i in range(num_layers)
        )
        self.norm = RMSNorm(hidden_size, eps=rms_norm_eps) if self.is_last else None

    def forward(
        self,
        input_ids: torch.Tensor | None,  # [T]
        positions: torch.Tensor,  # [T]
        intermediate: IntermediateTensors | None = None,
        aux_layer_ids: tuple[int, ...] = (),
    ) -> ModelOutput:
        if self.is_first:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            hidden = self.embed_tokens(input_ids)  # [T, H]
            residual: torch.Tensor | None = None
        else:
            if intermediate is None:
                raise ValueError("a later pipeline stage needs the previous stage's tensors")
            hidden, residual = intermediate.hidden_states, intermediate.residual
        wanted = set(aux_layer_ids)
        aux: dict[int, torch.Tensor] = {}
        for i in range(self.start_layer, self.end_layer):
            if i in wanted:
                aux[i] = hidden if residual is None else hidden + residual
            hidden, residual = self.layers[i](positions, hidden, residual)
        if not self.is_last:
            return ModelOutput(None, IntermediateTensors(hidden, residual), aux)
        if self.num_layers in wanted:
            aux[self.num_layers] = hidden if residual is None else hidden + residual
        if residual is None:
            hidden = self.norm(hidden)
        else:
            hidden, _ = self.norm(hidden, residual)
        return ModelOutput(hidden, None, aux)
