"""What an evaluation hands back: a table on stdout, a JSON report, a small line plot, a progress bar.

    print(table(["set", "fvd"], [["step 500", 812.3], ["step 1000", 402.9]]))
    write_report("report.json", {"fvd": 402.9, "protocol": "fvd2048_16f", ...})
    line_plot("fvd.png", [500, 1000], [812.3, 402.9], x_label="training step", y_label="FVD")

A report is one JSON object whose metric sits under its own name (`fvd`, `is`, `clipsim`) next to what makes the
number meaningful (protocol, counts, model file, times). `write_report` replaces only a file that is itself a
lavie-eval report (its `format` field); anything else at that path is refused. Plots are drawn with Pillow (no
plotting library is a dependency).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

REPORT_FORMAT = "lavie-eval"


class ReportPathError(ValueError):
    """The report path holds a file lavie-eval did not write; nothing was written."""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.6g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def check_report_path(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a report path that holds a file lavie-eval did not write."""
    path = Path(path)
    if path.is_dir():
        raise ReportPathError(f"--output {path} is a directory; give a file name such as {path / 'report.json'}")
    if path.exists():
        try:
            ours = json.loads(path.read_text()).get("format") == REPORT_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ReportPathError(f"--output {path} exists and is not a lavie-eval report; lavie-eval never "
                                  "replaces other files: choose another path")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> Path:
    """Write `report` as JSON (atomically; `format` added) after `check_report_path`."""
    path = check_report_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": REPORT_FORMAT, **report}, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return path


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def line_plot(path: str | os.PathLike, xs: Sequence[float], ys: Sequence[float], *, x_label: str, y_label: str,
              title: str = "", size: tuple[int, int] = (480, 300),
              reference: tuple[float, str] | None = None) -> Path:
    """A PNG line plot of `ys` against `xs` with its points marked and labelled (for a handful of points);
    `reference` (value, label) draws a dashed horizontal line, e.g. the distance of two real sets."""
    w, h = size
    left, right, top, bottom = 64, 16, 30, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    finite = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    d.text((left, 8), title or f"{y_label} against {x_label}", fill="black", font=font)
    d.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    d.text((left + (w - left - right) // 2 - 4 * len(x_label) // 2 * 1, h - 18), x_label, fill="black", font=small)
    d.text((4, top - 14), y_label, fill="black", font=small)
    if finite:
        x0, x1 = min(x for x, _ in finite), max(x for x, _ in finite)
        y0, y1 = min(0.0, min(y for _, y in finite)), max(y for _, y in finite)
        if reference is not None and math.isfinite(reference[0]):
            y0, y1 = min(y0, reference[0]), max(y1, reference[0])
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

        def at(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x0) / (x1 - x0) * (w - left - right - 20) + 10,
                    h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom - 10))

        for frac in (0.0, 0.5, 1.0):  # y ticks
            yv = y0 + frac * (y1 - y0)
            _, py = at(x0, yv)
            d.line([left - 4, py, left, py], fill="black")
            d.text((4, py - 6), _cell(yv), fill="black", font=small)
        if reference is not None and math.isfinite(reference[0]):
            _, ry = at(x0, reference[0])
            for xa in range(left, w - right, 12):
                d.line([xa, ry, min(xa + 6, w - right), ry], fill=(150, 150, 150))
            d.text((left + 6, ry - 14), reference[1], fill=(110, 110, 110), font=small)
        points = [at(x, y) for x, y in finite]
        if len(points) > 1:
            d.line(points, fill=(30, 90, 200), width=2)
        for (x, y), (px, py) in zip(finite, points):
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(30, 90, 200))
            d.text((px - 10, py - 16), _cell(y), fill="black", font=small)
            d.text((px - 8, h - bottom + 4), _cell(x), fill="black", font=small)
    path = Path(path)
    img.save(path)
    return path


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar on stderr (a no-op object when disabled or stderr is not wanted)."""
    if not enabled:
        class _Quiet:
            def update(self, n: int = 1) -> None:
                pass

            def set_postfix_str(self, s: str) -> None:
                pass

        yield _Quiet()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="video", dynamic_ncols=True, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()
