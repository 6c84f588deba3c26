"""bench_peer's report: the side-by-side table, the round split, the caption, earlier runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peer_common import RATES, SHAPE_NAMES, Case, K, Result, Settings


def mode_label(mode: str) -> str:
    return mode if mode == "plain" else f"{mode} synthetic"


def _fmt(ms: float | None, bs: int, plain: float | None) -> str:
    if ms is None:
        return "-"
    s = f"{ms:.2f} ({bs * 1000 / ms:.0f} tok/s"
    if plain is not None and ms > 0:
        s += f", {plain / ms:.2f}x"
    return s + ")"


def table(results: Sequence[Result], batch_sizes: Sequence[int]) -> tuple[str, list[dict]]:
    """The markdown table and its rows (one per shape, mode and batch size)."""
    by = {(r.side, r.case.target, r.case.mode): r for r in results}
    cases = list(dict.fromkeys(r.case for r in results))
    lines = [
        "| shape | mode | batch | outrider ms/step (agg tok/s, x plain) | "
        "vLLM ms/step (agg tok/s, x plain) | vLLM / outrider | outrider AL |",
        "|---|---|---|---|---|---|---|",
    ]
    rows: list[dict] = []
    for c in cases:
        for bs in batch_sizes:
            row: dict[str, Any] = {"shape": c.target, "mode": c.mode, "batch": bs}
            cells = []
            for side in ("outrider", "vllm"):
                r = by.get((side, c.target, c.mode))
                p = by.get((side, c.target, "plain"))
                ms = r.ms.get(bs) if r is not None else None
                plain = p.ms.get(bs) if p is not None and c.mode != "plain" else None
                row[f"{side}_ms"] = ms
                row[f"{side}_speedup_vs_plain"] = plain / ms if plain and ms else None
                cells.append(_fmt(ms, bs, plain))
            o, v = row["outrider_ms"], row["vllm_ms"]
            row["vllm_over_outrider"] = v / o if o and v else None
            ratio = f"{row['vllm_over_outrider']:.2f}" if row["vllm_over_outrider"] else "-"
            r_o = by.get(("outrider", c.target, c.mode))
            al = r_o.acceptance_length.get(bs) if r_o is not None else None
            row["outrider_acceptance_length"] = al
            lines.append(
                f"| {SHAPE_NAMES[c.target]} | {mode_label(c.mode)} | {bs} | {cells[0]} | "
                f"{cells[1]} | {ratio} | {'-' if al is None else f'{al:.2f}'} |"
            )
            rows.append(row)
    return "\n".join(lines), rows


def split_table(results: Sequence[Result], batch_sizes: Sequence[int]) -> str:
    """outrider's round time split (per-round means over the timed run)."""
    lines = [
        "| shape | mode | batch | rounds | mean k | round ms | p50 / max ms | draft ms "
        "| verify ms | overhead ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.side != "outrider":
            continue
        for bs in batch_sizes:
            sp = r.split.get(bs)
            if not sp or not sp.get("rounds"):
                continue
            lines.append(
                f"| {SHAPE_NAMES[r.case.target]} | {mode_label(r.case.mode)} | {bs} | "
                f"{sp['rounds']:.0f} | {sp['mean_k']:.2f} | {sp['wall_ms']:.2f} | "
                f"{sp.get('p50_ms', 0.0):.2f} / {sp.get('max_ms', 0.0):.2f} | "
                f"{sp['draft_ms']:.2f} | {sp['verify_ms']:.2f} | {sp['overhead_ms']:.2f} |"
            )
    return "\n".join(lines)


def stall_lines(results: Sequence[Result], batch_sizes: Sequence[int]) -> str:
    """Timed runs with one-off work: their slowest rounds and the Triton compiles inside."""
    lines = []
    for r in results:
        if r.side != "outrider":
            continue
        for bs in batch_sizes:
            sp = r.split.get(bs) or {}
            compiles = sp.get("compiles") or []
            slow = sp.get("slowest") or []
            if not compiles and not (slow and slow[0]["ms"] > 3.0 * sp.get("p50_ms", 0.0)):
                continue
            rounds = "; ".join(
                f"{t['ms']:.1f} ms (k {t['k']}, {t['seqs']} seqs, {t['tokens']} tokens, draft "
                f"{t['draft_ms']:.1f}, verify {t['verify_ms']:.1f}"
                + (", captured" if t["captured"] else "")
                + ")"
                for t in slow
            )
            names: dict[str, list[float]] = {}
            for c in compiles:
                names.setdefault(c["kernel"], []).append(c["ms"] or 0.0)
            built = ", ".join(f"{n} x{len(v)} ({sum(v):.0f} ms)" for n, v in names.items())
            lines.append(
                f"- {SHAPE_NAMES[r.case.target]} {mode_label(r.case.mode)} batch {bs}: slowest "
                f"{rounds}; Triton compiles in the timed run: {built or 'none'}"
            )
    return "\n".join(lines)


def caption(s: Settings, results: Sequence[Result]) -> str:
    rates = "/".join(f"{r:.2f}" for r in RATES)
    mine = [r for r in results if r.side == "outrider"]
    # NOTE: the first speculative run names the drafter's device (plain runs have none).
    first = mine[0].info if mine else {}
    ours = next((r.info for r in mine if r.info.get("drafter_device")), first)
    where = ""
    if ours:
        where = (
            f"; outrider target on {ours['target_device']}, drafter on "
            f"{ours.get('drafter_device') or ours['target_device']}, attention "
            f"{ours['attention_backend']}, MoE {ours['moe_backend']}, CUDA graphs "
            f"{'on' if ours['cuda_graphs'] else 'off'}, draft length "
            f"{s.draft_length_policy}"
        )
    return (
        f"Random weights; *synthetic* acceptance (rates {rates}, k={K}) on speculative rows; "
        f"{s.num_tokens} timed tokens per sequence after a {s.prompt_len}-token prompt; "
        f"ms/step = ms per token of each sequence (batch 1: ms/token){where}"
        + ("; SMOKE (tiny CPU shapes, not a measurement)" if s.smoke else "")
    )


def load_runs(paths: Sequence[str]) -> list[Result]:
    """The runs of earlier reports (a later file's run of the same side and case wins)."""
    runs: dict[tuple[str, Case], Result] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["runs"]:
            case = Case(r["shape"], r["mode"])
            res = Result(case, r["side"], info=r["info"])
            res.ms = {int(b): v for b, v in r["ms"].items()}
            res.ttft_ms = {int(b): v for b, v in r["ttft_ms"].items()}
            res.acceptance_length = {int(b): v for b, v in r["acceptance_length"].items()}
            res.split = {int(b): v for b, v in r.get("split", {}).items()}
            runs[(res.side, case)] = res
    return list(runs.values())
