"""benchmarks/bench_peer.py: the CPU smoke path end to end, peer.py output parsing, the table."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_peer", REPO / "benchmarks" / "bench_peer.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_peer"] = mod
    spec.loader.exec_module(mod)
    return mod


bp = _load()
pv = importlib.import_module("peer_vllm")  # NOTE: bench_peer put benchmarks/ on sys.path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench_peer") / "bench_peer.json"
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            report = bp.main(
                ["--smoke", "--batch-sizes", "1,2", "--tokens", "4", "--prompt-len", "8"]
                + ["--peer-dir", str(out.parent / "no-peer"), "--json", str(out)]
            )
    finally:
        torch.set_num_threads(threads)
    return report, buf.getvalue(), out


def test_smoke_table_rows_and_synthetic_label(smoke: tuple[dict[str, Any], str, Path]) -> None:
    report, stdout, out = smoke
    tables = stdout.split("\n\n")
    rows = [line for line in tables[1].splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "outrider ms/step" in header and "vLLM ms/step" in header
    want = [
        (shape, mode, bs)
        for shape, modes in (
            ("Llama-3.1-8B", ("plain", "eagle3 synthetic", "peagle synthetic")),
            ("Qwen3-30B-A3B", ("plain", "eagle3 synthetic")),
        )
        for mode in modes
        for bs in ("1", "2")
    ]
    got = [tuple(c.strip() for c in line.strip("|").split("|")[:3]) for line in body]
    assert got == want
    assert "*synthetic* acceptance (rates 0.72/0.50/0.33/0.22, k=4)" in stdout
    assert "SMOKE" in stdout
    split = [line for line in tables[2].splitlines() if line.startswith("| ") and "---" not in line]
    assert "overhead ms" in split[0]
    assert [tuple(c.strip() for c in line.strip("|").split("|")[:3]) for line in split[1:]] == want
    for line in split[1:]:
        cells = line.strip("|").split("|")
        wall, draft, verify, overhead = (float(cells[i]) for i in (5, 7, 8, 9))
        p50, slowest = (float(c) for c in cells[6].split("/"))
        assert draft >= 0 and verify > 0 and overhead >= 0
        assert abs(wall - (draft + verify + overhead)) < 0.02 * wall + 0.02
        assert 0 < p50 <= slowest
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))


def test_smoke_runs_each_mode_as_configured(smoke: tuple[dict[str, Any], str, Path]) -> None:
    report, _, _ = smoke
    runs = {(r["shape"], r["mode"]): r for r in report["runs"]}
    assert set(runs) == {("tgt", m) for m in ("plain", "eagle3", "peagle")} | {
        ("moe", m) for m in ("plain", "eagle3")
    }
    assert all(r["side"] == "outrider" for r in runs.values())
    assert runs[("tgt", "peagle")]["info"]["parallel_drafting"] is True
    assert runs[("tgt", "eagle3")]["info"]["parallel_drafting"] is False
    assert runs[("tgt", "plain")]["info"]["drafter_device"] is None
    for (_, mode), r in runs.items():
        assert set(r["ms"]) == {1, 2}
        for al in r["acceptance_length"].values():
            if mode == "plain":
                assert al is None
            else:
                assert 1.0 <= al <= bp.K + 1
    for row in report["rows"]:
        assert row["vllm_ms"] is None and row["vllm_over_outrider"] is None


def test_parse_peer_output() -> None:
    text = (
        "[eagle3] engine up in 41 s\n"
        "[tgt eagle3] batch 1: 2.65 ms per step-token (377 tok/s aggregate), TTFT~18 ms\n"
        "some vLLM log line\n"
        "[tgt eagle3] batch 8: 2.88 ms per step-token (2778 tok/s aggregate), TTFT~35 ms\n"
    )
    r = pv.parse_peer(text, bp.Case("tgt", "eagle3"))
    assert r.side == "vllm"
    assert r.ms == {1: 2.65, 8: 2.88}
    assert r.ttft_ms == {1: 18.0, 8: 35.0}


def test_table_side_by_side_ratio() -> None:
    case, plain = bp.Case("moe", "eagle3"), bp.Case("moe", "plain")
    results = [
        bp.Result(plain, "outrider", ms={1: 4.0}),
        bp.Result(case, "outrider", ms={1: 2.0}, acceptance_length={1: 2.77}),
        bp.Result(plain, "vllm", ms={1: 3.0}),
        bp.Result(case, "vllm", ms={1: 3.0}),
    ]
    text, rows = bp.table(results, (1,))
    row = next(r for r in rows if r["mode"] == "eagle3")
    assert row["vllm_over_outrider"] == pytest.approx(1.5)
    assert row["outrider_speedup_vs_plain"] == pytest.approx(2.0)
    assert row["vllm_speedup_vs_plain"] == pytest.approx(1.0)
    assert "| Qwen3-30B-A3B | eagle3 synthetic | 1 | 2.00 (500 tok/s, 2.00x) |" in text


def test_vllm_not_staged_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(bp.BenchError, match="vLLM is not staged: .*peer.py does not exist"):
        bp.check_vllm(tmp_path, sys.executable)


def test_bad_arguments() -> None:
    with pytest.raises(bp.BenchError, match="`--targets` must be of tgt, moe"):
        bp.resolve(bp.parse_args(["--targets", "mixtral"]))
    with pytest.raises(bp.BenchError, match="peagle runs on tgt only"):
        bp.resolve(bp.parse_args(["--targets", "moe", "--modes", "peagle"]))


def test_merge_puts_split_runs_side_by_side(
    smoke: tuple[dict[str, Any], str, Path], tmp_path: Path
) -> None:
    _, _, ours = smoke
    peer = pv.parse_peer(
        "[tgt plain] batch 1: 4.71 ms per step-token (212 tok/s aggregate), TTFT~20 ms\n",
        bp.Case("tgt", "plain"),
    )
    theirs = tmp_path / "vllm.json"
    theirs.write_text(
        json.dumps(
            {
                "runs": [
                    {
                        "side": "vllm",
                        "shape": "tgt",
                        "mode": "plain",
                        "ms": peer.ms,
                        "ttft_ms": peer.ttft_ms,
                        "acceptance_length": {},
                        "info": {},
                    }
                ]
            }
        )
    )
    with contextlib.redirect_stdout(io.StringIO()):
        report = bp.main(
            ["--merge", str(ours), str(theirs), "--batch-sizes", "1,2"]
            + ["--json", str(tmp_path / "merged.json")]
        )
    row = next(
        r for r in report["rows"] if (r["shape"], r["mode"], r["batch"]) == ("tgt", "plain", 1)
    )
    assert row["vllm_ms"] == 4.71
    assert row["vllm_over_outrider"] == pytest.approx(4.71 / row["outrider_ms"])
    assert len(report["runs"]) == 6
