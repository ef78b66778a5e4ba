"""The pieces of medtransfer's HTML pages (run report, run comparison), and number formatting.

Pages built from these open offline and print cleanly: images are base64 ``data:`` URIs,
the stylesheet is inline, there is no script and no network reference. Helpers that take
*text* escape it; parameters named ``content`` or ``body`` take HTML built by these helpers.

:func:`format_with_ci` is the one way a value with its confidence interval is written,
in pages, terminal tables and figure legends alike.

Example
-------
>>> format_with_ci(0.9623, (0.948, 0.975))
'0.962 (95% CI 0.948–0.975)'
>>> format_with_ci(0.12, (-0.01, 0.25), signed=True)
'+0.120 (95% CI -0.010 to +0.250)'
"""

from __future__ import annotations

import base64
import math
from html import escape as _escape
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeGuard

from medtransfer import __version__
from medtransfer.rundir import SplitMetrics

__all__ = [
    "DASH", "METRIC_ROWS", "escape", "figure", "figures", "format_duration", "format_number", "format_percent", "format_with_ci",
    "is_number", "note", "page", "section", "split_value", "table",
]

DASH = "\u2013"  # en dash: a missing value, and the range of an interval

# The metrics of a split, in table order: (metrics.json key, label). Each may have "<key>_ci".
METRIC_ROWS = (
    ("auc", "ROC AUC"),
    ("average_precision", "Average precision"),
    ("accuracy", "Accuracy"),
    ("sensitivity", "Sensitivity (recall)"),
    ("specificity", "Specificity"),
    ("precision", "Precision (PPV)"),
    ("npv", "NPV"),
    ("f1", "F1"),
)

_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}


# ------------------------------------------------------------------------- numbers


def is_number(value: Any) -> TypeGuard[float]:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: Any, digits: int = 3) -> str:
    """Numbers for people: ints with thousands separators, floats to ``digits`` decimals,
    booleans as yes/no, a missing or non-finite value as an en dash; text as it is."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_with_ci(
    value: Any, ci: Sequence[Any] | None = None, *, confidence: Any = 0.95, digits: int = 3, signed: bool = False
) -> str:
    """``0.962 (95% CI 0.948–0.975)``; the value alone when there is no finite interval.

    ``signed`` writes a difference (``+0.120 (95% CI -0.010 to +0.250)``); an interval with a
    negative bound is written "lo to hi", since an en dash between signed numbers misleads.
    """
    if not is_number(value):
        return format_number(value, digits)

    def number(v: Any) -> str:
        return f"{float(v):+.{digits}f}" if signed else format_number(float(v), digits)

    text = number(value) if signed else format_number(value, digits)
    if ci is None or len(ci) != 2 or not all(is_number(v) for v in ci):
        return text
    lo, hi = ci
    joint = " to " if signed or min(lo, hi) < 0 else DASH
    percent = confidence * 100 if is_number(confidence) else 95
    return f"{text} ({percent:g}% CI {number(lo)}{joint}{number(hi)})"


def split_value(split: SplitMetrics, key: str) -> str:
    """One metric of a split with its interval, e.g. ``split_value(metrics.test, "auc")``."""
    return format_with_ci(split.value(key), split.interval(key), confidence=split.confidence)


def format_duration(seconds: Any) -> str:
    """``42.0 s``, ``13 min 32 s``, ``2 h 05 min``; missing -> en dash."""
    if not is_number(seconds):
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_percent(value: Any) -> str:
    """0.928 -> ``92.8%``; missing -> en dash."""
    return f"{value * 100:.1f}%" if is_number(value) else DASH


# ---------------------------------------------------------------------------- HTML


def escape(value: Any) -> str:
    """Text (any value, via ``str``) made safe for HTML content and attribute values."""
    return _escape(str(value), quote=True)


def section(section_id: str, heading: str, content: str) -> str:
    return f'<section id="{escape(section_id)}">\n<h2>{escape(heading)}</h2>\n{content}\n</section>'


def note(text: str, *, css: str = "note") -> str:
    """A paragraph of text; ``css`` "note" (grey), "ok" (green bar) or "warn" (amber bar)."""
    return f'<p class="{css}">{escape(text)}</p>'


def table(header: Sequence[str] | None, rows: Iterable[Sequence[str]], *, css: str = "") -> str:
    """A table of text cells (escaped here); the first cell of each row is that row's header."""
    parts = [f'<table class="{escape(css)}">' if css else "<table>"]
    if header:
        parts.append("<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead>")
    parts.append("<tbody>")
    for first, *rest in rows:
        parts.append(f'<tr><th scope="row">{escape(first)}</th>' + "".join(f"<td>{escape(v)}</td>" for v in rest) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def figure(path: Path, caption: str) -> str:
    """An image file embedded as a data: URI, with its caption."""
    mime = _IMAGE_TYPES.get(Path(path).suffix.lower())
    if mime is None:
        return note(f"Cannot embed {Path(path).name}: not a PNG, JPEG, GIF or WebP image.")
    uri = f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img src="{uri}" alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption></figure>'


def figures(items: Iterable[tuple[Path | None, str]], *, css: str = "") -> str:
    """A grid of figures, ``(path, caption)`` each; a None path is skipped; "" when none is left.

    ``css``: "wide" gives each figure the full width (wide plots such as training curves),
    "gallery" smaller tiles."""
    shown = [figure(path, caption) for path, caption in items if path is not None]
    classes = f"figures {css}".strip()
    return f'<div class="{escape(classes)}">{"".join(shown)}</div>' if shown else ""


def page(title: str, body: str, *, subtitle: str = "", nav: Sequence[tuple[str, str]] = ()) -> str:
    """A whole HTML document: ``title`` as heading, a grey ``subtitle`` line, a navigation bar
    of ``(anchor id, label)`` links within the page, then ``body``."""
    links = " ".join(f'<a href="#{escape(anchor)}">{escape(label)}</a>' for anchor, label in nav)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="medtransfer {escape(__version__)}">
<link rel="icon" href="data:,">
<title>{escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{escape(title)}</h1>
{note(subtitle) if subtitle else ""}
{f"<nav>{links}</nav>" if links else ""}
</header>
<main>
{body}
</main>
</body>
</html>
"""


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1180px; padding: 1.5rem 1.5rem 3rem;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: #1d2330; background: #fff; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .75rem; padding-bottom: .25rem; border-bottom: 2px solid #dde3ec; }
h3 { font-size: 1.05rem; margin: 1.25rem 0 .5rem; }
nav { margin: .75rem 0 0; display: flex; flex-wrap: wrap; gap: .35rem .9rem; font-size: .9rem; }
nav a { color: #2456a6; text-decoration: none; }
nav a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #dde3ec; padding: .3rem .6rem; text-align: left; vertical-align: top; }
thead th { background: #f2f5f9; }
tbody th { font-weight: 600; background: #fafbfd; }
table.headline td { font-size: 1.05rem; font-weight: 600; }
table.history td { text-align: right; }
table.history tr.best td { background: #fff6d6; font-weight: 600; }
table.config td { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem; word-break: break-word; }
table.confusion td { text-align: right; min-width: 6rem; }
table.metrics td, table.tests td, table.findings td { white-space: nowrap; }
.scroll { overflow-x: auto; }
details { margin: .5rem 0 1rem; }
summary { cursor: pointer; color: #2456a6; }
.lead { font-size: 1.05rem; }
.note { color: #5a6474; font-size: .9rem; }
.caption { margin-bottom: 0; font-weight: 600; }
.ok { border-left: 4px solid #2e8b57; background: #eef8f2; padding: .4rem .7rem; }
.warn { border-left: 4px solid #c27c0e; background: #fdf5e6; padding: .4rem .7rem; }
.first-screen { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1.5rem; align-items: start; }
.first-screen figure { max-width: 560px; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1rem; }
.figures.wide { grid-template-columns: minmax(0, 1fr); }
.figures.wide figure { max-width: 1100px; }
.figures.gallery { grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); }
figure { margin: 0; border: 1px solid #dde3ec; border-radius: 4px; padding: .5rem; background: #fff; }
figure img { display: block; width: 100%; height: auto; }
figcaption { font-size: .85rem; color: #5a6474; margin-top: .35rem; }
li { overflow-wrap: anywhere; }
@media (max-width: 800px) { .first-screen { grid-template-columns: minmax(0, 1fr); } }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  nav { display: none; }
  section { break-inside: auto; }
  h2, h3 { break-after: avoid; }
  figure, table, .ok, .warn { break-inside: avoid; }
  .figures { grid-template-columns: repeat(2, 1fr); }
  .figures.wide { grid-template-columns: minmax(0, 1fr); }
  .scroll { overflow: visible; }
  table.findings td { white-space: normal; }
  a { color: inherit; text-decoration: none; }
}
"""
