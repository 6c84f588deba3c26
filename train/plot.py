"""A loss curve as a PNG, drawn with numpy and written with zlib (no plotting dependency)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def _png(rgb: np.ndarray) -> bytes:
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _line(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, color: tuple[int, ...]) -> None:
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    xs = np.linspace(x0, x1, n + 1).round().astype(int)
    ys = np.linspace(y0, y1, n + 1).round().astype(int)
    for dy in (0, 1):
        img[np.clip(ys + dy, 0, img.shape[0] - 1), np.clip(xs, 0, img.shape[1] - 1)] = color


def plot_curves(
    path: Path,
    steps: Sequence[int],
    series: Sequence[Sequence[float]],
    *,
    width: int = 640,
    height: int = 360,
    log_y: bool = True,
) -> None:
    """Up to four curves over shared x values, on a white canvas with axes and a light grid."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 48, width - 16, 16, height - 32
    img[top:bottom, left] = 0
    img[bottom, left:right] = 0
    if not steps or not series:
        path.write_bytes(_png(img))
        return
    ys_all = np.array([v for s in series for v in s], dtype=np.float64)
    ys_all = ys_all[np.isfinite(ys_all) & ((ys_all > 0) if log_y else True)]
    if ys_all.size == 0:
        path.write_bytes(_png(img))
        return

    def tf(v: np.ndarray) -> np.ndarray:
        return np.log10(np.maximum(v, 1e-12)) if log_y else v

    lo, hi = float(tf(ys_all).min()), float(tf(ys_all).max())
    if hi - lo < 1e-9:
        hi = lo + 1.0
    x = np.asarray(steps, dtype=np.float64)
    x_lo, x_hi = float(x.min()), float(max(x.max(), x.min() + 1))
    for g in np.linspace(top, bottom, 5).astype(int)[:-1]:
        img[g, left + 1 : right : 4] = 200
    px = (left + (x - x_lo) / (x_hi - x_lo) * (right - left)).round().astype(int)
    for si, s in enumerate(series[: len(_COLORS)]):
        v = tf(np.asarray(s, dtype=np.float64))
        py = (bottom - (v - lo) / (hi - lo) * (bottom - top)).round().astype(int)
        for i in range(1, len(px)):
            if np.isfinite(v[i - 1]) and np.isfinite(v[i]):
                _line(img, px[i - 1], py[i - 1], px[i], py[i], _COLORS[si])
    path.write_bytes(_png(img))
