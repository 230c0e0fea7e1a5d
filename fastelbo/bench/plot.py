"""The speedup plot as a PNG, drawn without any plotting library.

fastelbo depends on torch and numpy only; a benchmark that needs matplotlib
would either add a heavy dependency for one picture or produce no picture on
the machines (CI runners) where it matters. The plot is a grouped bar chart,
so a small raster (bars, grid lines, a 5x7 bitmap font) and the PNG format
(zlib + crc32 from the standard library) are all it takes.

Layout: one panel per op and pass; in each, one group of bars per shape and
dtype; per fastelbo backend one bar for the speedup vs eager and one vs
torch.compile; log2 y axis shared by all panels, a line at 1x.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

from . import cases as C

# 5x7 glyphs, rows top to bottom, bit 4 = leftmost column.
_FONT_ROWS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    "x": "00000 00000 10001 01010 00100 01010 10001", " ": "00000 00000 00000 00000 00000 00000 00000",
    ".": "00000 00000 00000 00000 00000 01100 01100", ",": "00000 00000 00000 00000 01100 00100 01000",
    ":": "00000 01100 01100 00000 01100 01100 00000", "-": "00000 00000 00000 11111 00000 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000", "/": "00000 00001 00010 00100 01000 10000 00000",
    "=": "00000 00000 11111 00000 11111 00000 00000", "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000", "[": "01110 01000 01000 01000 01000 01000 01110",
    "]": "01110 00010 00010 00010 00010 00010 01110", "_": "00000 00000 00000 00000 00000 00000 11111",
    "%": "11000 11001 00010 00100 01000 10011 00011", "<": "00010 00100 01000 10000 01000 00100 00010",
    ">": "01000 00100 00010 00001 00010 00100 01000", "*": "00000 00100 10101 01110 10101 00100 00000",
    "?": "01110 10001 00001 00010 00100 00000 00100", "'": "00100 00100 01000 00000 00000 00000 00000",
}
FONT = {ch: [int(r, 2) for r in rows.split()] for ch, rows in _FONT_ROWS.items()}

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (30, 30, 30), (120, 120, 120), (225, 225, 225)
RED = (200, 40, 40)
# (vs eager, vs compile) colours per backend
PALETTE = [((31, 119, 180), (255, 127, 14)), ((44, 160, 44), (214, 39, 40)), ((148, 103, 189), (140, 86, 75))]


class Canvas:
    def __init__(self, width: int, height: int, bg=WHITE):
        self.w, self.h = width, height
        self.px = bytearray(bytes(bg) * (width * height))

    def rect(self, x0, y0, x1, y1, color) -> None:
        """Fills [x0, x1) x [y0, y1), clipped."""
        x0, x1 = max(0, int(x0)), min(self.w, int(x1))
        y0, y1 = max(0, int(y0)), min(self.h, int(y1))
        if x0 >= x1:
            return
        line = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            i = (y * self.w + x0) * 3
            self.px[i:i + len(line)] = line

    def hline(self, x0, x1, y, color, dash: int = 0) -> None:
        if dash:
            for x in range(int(x0), int(x1), 2 * dash):
                self.rect(x, y, min(x + dash, x1), y + 1, color)
        else:
            self.rect(x0, y, x1, y + 1, color)

    def text(self, x, y, s: str, color=BLACK, scale: int = 1) -> None:
        for ch in s:
            glyph = FONT.get(ch) or FONT.get(ch.upper()) or FONT["?"]
            for r, bits in enumerate(glyph):
                for c in range(5):
                    if bits & (1 << (4 - c)):
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale, y + (r + 1) * scale, color)
            x += 6 * scale

    @staticmethod
    def text_width(s: str, scale: int = 1) -> int:
        return 6 * scale * len(s)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _series(doc: dict):
    """{(op, pass): {(shape, dtype): {(backend, metric): value}}} in sweep order."""
    panels: dict = {}
    for r in doc["results"]:
        if not r["impl"].startswith(C.FASTELBO_PREFIX) or "median_s" not in r:
            continue
        group = panels.setdefault((r["op"], r["pass"]), {}).setdefault((r["shape"], r["dtype"]), {})
        backend = r["impl"][len(C.FASTELBO_PREFIX):]
        for metric in ("vs_eager", "vs_compile"):
            v = r.get(f"speedup_{metric}")
            if v is not None and v > 0:
                group[(backend, metric)] = v
    return panels


def render(doc: dict) -> bytes:
    panels = _series(doc)
    backends = []
    for groups in panels.values():
        for bars in groups.values():
            for b, _ in bars:
                if b not in backends:
                    backends.append(b)
    values = [v for groups in panels.values() for bars in groups.values() for v in bars.values()]
    lo = min([0.5] + values)
    hi = max([4.0] + values)
    lo2, hi2 = math.floor(math.log2(lo)), math.ceil(math.log2(hi * 1.15))
    n_groups = max([len(g) for g in panels.values()] + [1])
    bars_per_group = max(2 * len(backends), 2)
    bar_w, gap = 14, 26
    group_w = max(bars_per_group * bar_w + gap, 96)
    left, right, top = 70, 20, 96
    panel_h, plot_h = 210, 150
    title = f"fastelbo speedup ({doc.get('mode', '')} sweep) - higher is better, 1x = same speed as the baseline"
    width = max(left + right + n_groups * group_w, Canvas.text_width(title, 2) + 20)
    height = top + max(len(panels), 1) * panel_h + 20
    cv = Canvas(width, height)

    m = doc.get("machine", {})
    cv.text(10, 8, title, BLACK, 2)
    where = (f"device {m.get('device', '?')}: {m.get('device_name', '?')}, {m.get('torch_threads', '?')} threads, "
             f"torch {m.get('torch', '?')}, {doc.get('created', '')}")
    cv.text(10, 34, where, GREY, 1)
    x = 10
    for i, b in enumerate(backends):
        for j, metric in enumerate(("vs eager", "vs torch.compile")):
            color = PALETTE[i % len(PALETTE)][j]
            cv.rect(x, 52, x + 12, 64, color)
            label = f"fastelbo-{b} {metric}"
            cv.text(x + 16, 54, label, BLACK, 1)
            x += 16 + cv.text_width(label) + 20
    if not panels:
        cv.text(10, top, "no fastelbo backend was measured: nothing to plot", RED, 2)

    def y_of(v, y_base):
        return y_base - (math.log2(v) - lo2) / max(hi2 - lo2, 1) * plot_h

    for p, ((op, pass_), groups) in enumerate(panels.items()):
        y0 = top + p * panel_h
        y_base = y0 + 18 + plot_h
        cv.text(left, y0, f"{op} {pass_}", BLACK, 2)
        step = 1 if hi2 - lo2 <= 10 else 2
        for k in range(lo2, hi2 + 1):
            y = int(y_of(2.0 ** k, y_base))
            cv.hline(left, width - right, y, LIGHT)
            if k % step == 0:
                label = f"{2.0 ** k:g}x" if k >= 0 else f"1/{2 ** -k}x"
                cv.text(left - 6 - cv.text_width(label), y - 3, label, GREY, 1)
        cv.hline(left, width - right, int(y_of(1.0, y_base)), BLACK)
        for g, ((shape, dtype), bars) in enumerate(groups.items()):
            gx = left + g * group_w + (group_w - bars_per_group * bar_w) // 2
            for i, b in enumerate(backends):
                for j, metric in enumerate(("vs_eager", "vs_compile")):
                    v = bars.get((b, metric))
                    if v is None:
                        continue
                    bx = gx + (2 * i + j) * bar_w
                    y1, yv = y_of(1.0, y_base), y_of(v, y_base)
                    cv.rect(bx, min(y1, yv), bx + bar_w - 2, max(y1, yv) + 1, PALETTE[i % len(PALETTE)][j])
            # value labels: one line per bar group (bars are too narrow for text)
            vals = " ".join(f"{bars[(b, mt)]:.1f}" for b in backends for mt in ("vs_eager", "vs_compile")
                            if (b, mt) in bars)
            lx = left + g * group_w + 4
            cv.text(lx, y_base + 6, shape, BLACK, 1)
            cv.text(lx, y_base + 16, dtype, GREY, 1)
            cv.text(lx, y_base + 26, vals, BLACK, 1)
    return cv.png()


def write_png(doc: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render(doc))
    return path


__all__ = ["render", "write_png", "Canvas"]
