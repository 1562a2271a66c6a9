"""Small PNG charts drawn with Pillow (installed with torchvision): line charts with ±std bands and bar charts with
error whiskers, composed side by side into one figure. Enough for the study's plots, nothing more."""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
PANEL_W, PANEL_H = 560, 400
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 78, 16, 36, 52


@dataclass
class Line:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    spread: Optional[Sequence[float]] = None  # half-width of a shaded band around ys (e.g. the std over seeds)


@dataclass
class LineChart:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line]


@dataclass
class BarChart:
    title: str
    ylabel: str
    labels: list[str]
    values: list[float]
    errors: list[float]  # whisker half-lengths (e.g. the std over seeds)


def _font(size: int):
    return ImageFont.load_default(size=size)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"cannot plot non-finite range [{lo}, {hi}]")
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks = [first + i * step for i in range(math.ceil((hi - first) / step) + 1)]
    return [round(t, 12) for t in ticks]


def _label(value: float) -> str:
    return f"{value:.4g}"


class _Panel:
    """One chart's axes inside the figure: maps data coordinates to pixels."""

    def __init__(self, draw: ImageDraw.ImageDraw, left: int, top: int, xticks, yticks):
        self.draw = draw
        self.x0, self.y0 = left + MARGIN_L, top + MARGIN_T
        self.x1, self.y1 = left + PANEL_W - MARGIN_R, top + PANEL_H - MARGIN_B
        self.xlo, self.xhi, self.ylo, self.yhi = xticks[0], xticks[-1], yticks[0], yticks[-1]
        self.xticks, self.yticks = xticks, yticks

    def px(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.xlo) / (self.xhi - self.xlo)
        fy = (y - self.ylo) / (self.yhi - self.ylo)
        return self.x0 + fx * (self.x1 - self.x0), self.y1 - fy * (self.y1 - self.y0)

    def frame(self, title: str, xlabel: str, ylabel: str, xtick_labels=None) -> None:
        d, small = self.draw, _font(12)
        for y in self.yticks:
            _, py = self.px(self.xlo, y)
            d.line([self.x0, py, self.x1, py], fill=(230, 230, 230))
            d.text((self.x0 - 6, py), _label(y), fill=(0, 0, 0), font=small, anchor="rm")
        d.rectangle([self.x0, self.y0, self.x1, self.y1], outline=(0, 0, 0))
        for i, x in enumerate(self.xticks if xtick_labels is None else xtick_labels):
            px, _ = self.px(x if xtick_labels is None else i, self.ylo)
            text = _label(x) if xtick_labels is None else str(x)
            d.text((px, self.y1 + 6), text, fill=(0, 0, 0), font=small, anchor="ma")
        d.text(((self.x0 + self.x1) / 2, self.y0 - 10), title, fill=(0, 0, 0), font=_font(15), anchor="md")
        if xlabel:
            d.text(((self.x0 + self.x1) / 2, self.y1 + 28), xlabel, fill=(0, 0, 0), font=_font(13), anchor="ma")
        d.text((self.x0 - MARGIN_L + 4, self.y0 - 30), ylabel, fill=(0, 0, 0), font=_font(13), anchor="la")


def _draw_lines(image: Image.Image, left: int, top: int, chart: LineChart) -> None:
    xs = [x for line in chart.lines for x in line.xs]
    ys = [y + s * sign for line in chart.lines
          for y, s in zip(line.ys, line.spread or [0.0] * len(line.ys)) for sign in (-1, 1)]
    panel = _Panel(ImageDraw.Draw(image), left, top, nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys)))
    panel.frame(chart.title, chart.xlabel, chart.ylabel)
    for i, line in enumerate(chart.lines):
        colour = COLOURS[i % len(COLOURS)]
        if line.spread is not None and len(line.xs) > 1:  # translucent band, blended over what is drawn already
            band = Image.new("RGBA", image.size, (0, 0, 0, 0))
            upper = [panel.px(x, y + s) for x, y, s in zip(line.xs, line.ys, line.spread)]
            lower = [panel.px(x, y - s) for x, y, s in zip(line.xs, line.ys, line.spread)]
            ImageDraw.Draw(band).polygon(upper + lower[::-1], fill=(*colour, 45))
            image.alpha_composite(band)
        points = [panel.px(x, y) for x, y in zip(line.xs, line.ys)]
        draw = ImageDraw.Draw(image)
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points if len(points) <= 40 else []:
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)
        key_y = panel.y0 + 12 + 16 * i  # legend: a short stroke in the line's colour, then its label
        draw.line([panel.x0 + 8, key_y, panel.x0 + 24, key_y], fill=colour, width=3)
        draw.text((panel.x0 + 30, key_y), line.label, fill=colour, font=_font(12), anchor="lm")


def _draw_bars(image: Image.Image, left: int, top: int, chart: BarChart) -> None:
    lows = [min(0.0, v - e) for v, e in zip(chart.values, chart.errors)]
    highs = [max(0.0, v + e) for v, e in zip(chart.values, chart.errors)]
    n = len(chart.values)
    panel = _Panel(ImageDraw.Draw(image), left, top, [-0.5, n - 0.5], nice_ticks(min(lows), max(highs)))
    panel.frame(chart.title, "", chart.ylabel, xtick_labels=chart.labels)
    draw = ImageDraw.Draw(image)
    for i, (value, error) in enumerate(zip(chart.values, chart.errors)):
        colour = COLOURS[i % len(COLOURS)]
        (xa, ya), (xb, yb) = panel.px(i - 0.32, 0.0), panel.px(i + 0.32, value)
        draw.rectangle([xa, min(ya, yb), xb, max(ya, yb)], fill=colour)
        xm, top_px = panel.px(i, value + error)
        _, bottom_px = panel.px(i, value - error)
        draw.line([xm, top_px, xm, bottom_px], fill=(0, 0, 0), width=2)
        for py in (top_px, bottom_px):
            draw.line([xm - 6, py, xm + 6, py], fill=(0, 0, 0), width=2)


def save_figure(path: Path, charts: list) -> None:
    """Draw `charts` (LineChart or BarChart) side by side and write them to one PNG."""
    image = Image.new("RGBA", (PANEL_W * len(charts), PANEL_H), (255, 255, 255, 255))
    for i, chart in enumerate(charts):
        (_draw_lines if isinstance(chart, LineChart) else _draw_bars)(image, i * PANEL_W, 0, chart)
    image.convert("RGB").save(path, format="PNG")
