"""Pure parts of drafter training: draft vocabulary, attention masks, the PNG writer, config."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import torch

from outrider.train.config import OptimConfig, TrainConfig
from outrider.train.modules import block_mask, chain_mask, parallel_chain_mask
from outrider.train.plot import plot_curves
from outrider.train.vocab import build_draft_vocab, count_tokens
from outrider.workers.config import ConfigError


def test_draft_vocab_keeps_most_frequent_sorted_with_speculators_offsets() -> None:
    counts = count_tokens([[5, 5, 5, 9, 9, 2], [9, 7, 7, 7, 7]], vocab_size=12)
    v = build_draft_vocab(counts, 3)
    assert v.kept.tolist() == [5, 7, 9]
    assert v.d2t.tolist() == [5, 6, 7]  # target = draft + d2t[draft]
    ids = torch.arange(3) + v.d2t
    assert ids.tolist() == [5, 7, 9] and bool(v.t2d[ids].all()) and int(v.t2d.sum()) == 3
    assert v.coverage(counts) == pytest.approx(10 / 11)


def test_draft_vocab_fills_unseen_ids_from_zero() -> None:
    counts = count_tokens([[6, 6, 3]], vocab_size=8)
    v = build_draft_vocab(counts, 4)
    assert v.kept.tolist() == [0, 1, 3, 6]
    assert bool((v.d2t[1:] >= v.d2t[:-1]).all())
    with pytest.raises(ValueError, match=r"`draft_vocab_size` must be in \[1, 8\]"):
        build_draft_vocab(counts, 9)


def test_chain_mask_is_the_kv_cache_view_of_a_draft_step() -> None:
    m = chain_mask(3, 2, torch.device("cpu"))
    assert m.shape == (3, 9)
    # row 1: step-0 keys 0..1, then its own key in each of the two later blocks
    assert m[1].tolist() == [True, True, False, False, True, False, False, True, False]


def test_parallel_chain_mask_rows_see_depth0_prefix_and_own_chain() -> None:
    t, d = 4, 3
    m = parallel_chain_mask(t, d, torch.device("cpu"))
    assert m.shape == (t * d, t * d)
    for depth in range(d):
        for i in range(t):
            row = m[depth * t + i].view(d, t)
            assert row[0].tolist() == [j <= i for j in range(t)]
            for dd in range(1, d):
                assert row[dd].tolist() == [dd <= depth and j == i for j in range(t)]


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_sees_context_before_anchor_and_own_block(causal: bool) -> None:
    anchors = torch.tensor([[2, 4]])
    m = block_mask(anchors, 6, 3, causal)
    assert m.shape == (1, 6, 12)
    ctx, blocks = m[0, :, :6], m[0, :, 6:]
    assert ctx[0].tolist() == [True, True, False, False, False, False]
    assert ctx[3].tolist() == [True] * 4 + [False] * 2
    own = blocks[1].tolist()
    assert own[3:] == [False] * 3
    assert own[:3] == ([True, True, False] if causal else [True] * 3)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length = struct.unpack(">I", data[8:12])[0]
    assert data[12:16] == b"IHDR"
    body = data[12 : 16 + length]
    assert struct.unpack(">I", data[16 + length : 20 + length])[0] == zlib.crc32(body)
    return struct.unpack(">II", data[16:24])


def test_loss_curve_png_is_valid_and_draws_the_curve(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    plot_curves(path, [10, 20, 30, 40], [[4.0, 2.0, 1.0, 0.5]], width=200, height=100)
    data = path.read_bytes()
    assert _png_size(data) == (200, 100)
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    raw = zlib.decompress(data[idat + 4 : idat + 4 + length])
    rows = [raw[y * 601 + 1 : (y + 1) * 601] for y in range(100)]
    blue = sum(row.count(bytes((31, 119, 180))) for row in rows)
    assert blue > 100


def test_train_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"`optim.lr` must be > 0, got 0.0"):
        TrainConfig(method="eagle3", out="x", optim=OptimConfig(lr=0.0)).validate()
    with pytest.raises(ConfigError, match="`method` must be one of"):
        TrainConfig(method="medusa", out="x").validate()  # type: ignore[arg-type]
    assert TrainConfig(method="dflash", out="x").num_layers == 2
