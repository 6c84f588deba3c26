"""The skinny GEMM's dispatch tables (kernels/fused/skinny_gemm_configs) and how they are read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from outrider.kernels.fused import skinny_table as sg

TABLES = sorted(Path(sg.__file__).with_name("skinny_gemm_configs").glob("*.json"))


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_committed_table_is_consistent(path: Path) -> None:
    data = json.loads(path.read_text())
    assert sg.device_slug(data["device"]) == path.stem
    assert data["entries"]
    for key, e in data["entries"].items():
        prologue, rows, n, k = key.split(":")
        assert prologue in sg.PROLOGUES and int(rows) in (1, 2, 4, 8, 16)
        assert int(n) > 0 and int(k) > 0
        cfg = sg.SkinnyConfig(**e["config"])
        for v in (cfg.block_n, cfg.block_k):
            assert v & (v - 1) == 0, f"{key}: tile sizes are powers of two"
        if "chain" in e:
            # NOTE: chosen inside a model step (bench-kernels), where every run beat every run
            # of the table without it.
            assert e["use"], key
            assert max(e["chain"]["us"]) < min(e["chain"]["baseline_us"]), key
            assert e["chain"]["step"] and e["chain"]["why"], key
            continue
        # NOTE: an entry is used only where it beat cuBLAS plus the separate prologue launch.
        assert e["use"] == (e["us"] < 0.98 * e["baseline_us"]), key
        assert e["max_row_error"] < 1e-2, key


def test_table_reader_keeps_used_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = {
        "device": "Test GPU",
        "entries": {
            "none:1:64:32": sg.config_entry(sg.SkinnyConfig(16, 32), use=True),
            "none:8:64:32": sg.config_entry(sg.SkinnyConfig(32, 32), use=False),
        },
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("OUTRIDER_SKINNY_GEMM_CONFIG", str(path))
    sg._table.cache_clear()
    try:
        assert sg._table("Test GPU") == {"none:1:64:32": sg.SkinnyConfig(16, 32)}
    finally:
        sg._table.cache_clear()


def test_plan_is_gpu_only_and_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    assert sg.plan(x, w, "none") is None  # CPU tensors keep their own path
    monkeypatch.setenv("OUTRIDER_SKINNY_GEMM", "0")
    assert not sg.enabled()
