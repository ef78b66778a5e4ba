"""Report sections on what the data holds: the leakage check (with near-duplicate pairs side by
side), for `evaluate` on an external set the shift summary (evaluation.shift), and the
explanation gallery's introduction.

Near-duplicate thumbnails are decoded once, when the run is written, from the run's own images (as
training decodes them, DICOM included) into ``plots/leakage/pair-NN-a.png`` (:func:`write_pair_thumbnails`);
the report embeds only those files, from inside the run folder, never a path that metrics.json names.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from PIL import Image

from medtransfer.data.decode import decode_image
from medtransfer.errors import DataError
from medtransfer.evaluation import html as h
from medtransfer.rundir import SplitMetrics
from medtransfer.safeio import atomic_path

__all__ = [
    "LEAKAGE_DIR", "border_evidence_html", "foreign_inputs_html", "gallery_intro_html", "leakage_html", "shift_html",
    "write_pair_thumbnails",
]

LEAKAGE_DIR = Path("plots") / "leakage"


def leakage_html(leakage: dict[str, Any] | None, root: Path | None = None) -> str:
    """What the leakage check compared and found; near-duplicate pairs side by side (their thumbnails from
    ``root``, the run folder; without it, or without thumbnails there, the pairs are listed)."""
    if leakage is None:
        return h.note("No leakage check recorded in metrics.json.")
    text = leakage.get("summary") or (
        "no patient and no byte-identical image appears in two splits." if leakage.get("clean") else
        f"Leakage check failed: {h.format_number(leakage.get('shared_patients'))} patient(s) in more than one split, "
        f"{h.format_number(leakage.get('duplicate_images'))} byte-identical image(s) in more than one split."
    )
    if leakage.get("clean"):
        return h.note(text if leakage.get("summary") else f"Leakage check passed: {text}", css="ok")
    examples = "".join(f"<li>{h.escape(x)}</li>" for x in leakage.get("examples") or [])
    parts = [h.note(text, css="warn") + (f"<ul>{examples}</ul>" if examples else "")]
    pairs = [p for p in leakage.get("near_duplicate_pairs") or [] if isinstance(p, dict)][:_PAIRS_SHOWN]
    if pairs:
        tiles = "".join(_pair_tile(p, root) for p in pairs)
        total = leakage.get("near_duplicates") or len(pairs)
        parts.append(f"<h3>Near-duplicate pairs in two splits ({h.format_number(len(pairs))} of {h.format_number(total)} shown)</h3>")
        parts.append(f'<div class="figures gallery">{tiles}</div>')
    return "".join(parts)


_PAIRS_SHOWN = 12
_THUMB_PX = 128


def write_pair_thumbnails(run_dir: Path, leakage: dict[str, Any] | None, *, readable: set[str] | None = None) -> None:
    """Decode the first near-duplicate pairs' images (paths as the leakage check found them) into
    ``run_dir/plots/leakage/pair-NN-{a,b}.png`` and name those files in each pair's "thumbnails" (None where an
    image cannot be read, or is not in `readable` when given). Earlier thumbnails are removed first."""
    pairs = [p for p in (leakage or {}).get("near_duplicate_pairs") or [] if isinstance(p, dict)][:_PAIRS_SHOWN]
    folder = Path(run_dir) / LEAKAGE_DIR
    for stale in folder.glob("pair-*.png") if folder.is_dir() else ():
        stale.unlink()
    for number, pair in enumerate(pairs, start=1):
        pair["thumbnails"] = [_write_thumbnail(Path(run_dir), str(pair.get(f"path_{side}")), f"pair-{number:02d}-{side}.png",
                                               readable) for side in ("a", "b")]


def _write_thumbnail(run_dir: Path, source: str, name: str, readable: set[str] | None) -> str | None:
    if readable is not None and source not in readable:
        return None
    try:
        pixels = decode_image(Path(source), size=_THUMB_PX)
    except (DataError, OSError):
        return None
    (run_dir / LEAKAGE_DIR).mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / LEAKAGE_DIR / name) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")
    return (LEAKAGE_DIR / name).as_posix()


def _thumbnail(relative: Any, root: Path | None, shown: str) -> str:
    """An <img> of a thumbnail file inside the run folder `root`, or a note when there is none."""
    path = (root / relative).resolve() if root is not None and isinstance(relative, str) and relative else None
    if root is None or path is None or not path.is_relative_to(root.resolve()) or not path.is_file():
        return h.note(f"{shown}: no thumbnail in the run folder")
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="{uri}" alt="{h.escape(shown)}" style="width:49%">'


def _pair_tile(pair: dict[str, Any], root: Path | None) -> str:
    names = [Path(str(pair.get(f"path_{side}"))).name for side in ("a", "b")]
    caption = (
        f"{names[0]} ({pair.get('split_a')}) ~ {names[1]} "
        f"({pair.get('split_b')}): {pair.get('distance')} bits, correlation {h.format_number(pair.get('correlation'), 4)}"
    )
    thumbnails = pair.get("thumbnails")
    thumbnails = [*thumbnails, None, None][:2] if isinstance(thumbnails, list) else [None, None]
    images = " ".join(_thumbnail(t, root, n) for t, n in zip(thumbnails, names))
    return f"<figure>{images}<figcaption>{h.escape(caption)}</figcaption></figure>"


def shift_html(shift: Any) -> str:
    """`evaluate` on an external set: how it differs from the run's own test split ("" without one)."""
    if not isinstance(shift, dict):
        return ""
    fmt = h.format_number
    reference = shift.get("reference")
    ref: dict[str, Any] = reference if isinstance(reference, dict) else {}
    keys = (
        ("Images", "n", 0), ("Prevalence (positive share)", "prevalence", 3), ("Mean predicted probability", "mean_probability", 3),
        ("Calibration in the large (ideal 0)", "calibration_in_the_large", 3), ("Calibration slope (ideal 1)", "calibration_slope", 3),
    ) + ((("Flagged as foreign by the OOD guard", "ood_flagged_fraction", 3),) if "ood_flagged_fraction" in shift else ())
    rows = [(label, fmt(shift.get(key), digits), fmt(ref.get(key), digits)) for label, key, digits in keys]
    parts = [h.table(["", "This set", h.escape(ref.get("name") or "run's test split: not available")], rows)]
    if ref:
        parts.append(h.note(
            f"Score distribution: two-sample Kolmogorov-Smirnov distance {fmt(ref.get('ks_distance'))} "
            f"(p = {fmt(ref.get('ks_pvalue'), 4)}) between the positive-class probabilities here and on the run's own split."
        ))
    parts.append(h.note(
        "Calibration in the large: intercept a of logit P(y) = a + logit(p) (below 0: risks overestimated). "
        "Calibration slope: b of logit P(y) = a + b logit(p) (below 1: predictions too extreme). "
        "`medtransfer recalibrate` refits temperature and threshold on local data."
    ))
    return h.section("shift", "Shift", "\n".join(parts))


def foreign_inputs_html(ood: Any, test: SplitMetrics | None) -> str:
    """metrics.json "ood" (from `medtransfer evaluate` with an OOD detector): flagged share, metrics without them."""
    if not isinstance(ood, dict):
        return ""
    fmt = h.format_number
    lead = (f"{fmt(ood.get('flagged'))} image(s) ({fmt(100 * ood.get('flagged_fraction', 0), 1)}%) do not look like the "
            f"training data: OOD score ({h.escape(str(ood.get('method')))}) above {fmt(ood.get('threshold'))}, "
            "the level that accepts 95% of the run's validation images.")
    rest = SplitMetrics.from_dict(ood["test_without_flagged"]) if isinstance(ood.get("test_without_flagged"), dict) else None
    table = ""
    if rest is not None and test is not None:
        rows = [[label, fmt(test.value(key)), fmt(rest.value(key))] for key, label in h.METRIC_ROWS]
        table = h.table(["Metric", "All images", "Without flagged images"], rows + [["Images", fmt(test.n), fmt(rest.n)]])
    return h.section("foreign-inputs", "Foreign inputs", h.note(lead) + table)


def border_evidence_html(block: Any, root: Path) -> str:
    """metrics.json "border_evidence" (explain/border.py): the shortcut check, flagged above its level,
    with the worst cases (PNG files under ``root``); "" when the run has none."""
    if not isinstance(block, dict):
        return ""
    fmt, pct = h.format_number, lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    band = block.get("band", 0)
    lead = (
        f"Share of the {h.escape(str(block.get('method')))} evidence (positive heatmap mass, predicted class) in the outer "
        f"{100 * band:.0f}% of each side ({pct(block.get('band_area_share'))} of the area) and in its four corners "
        f"({pct(block.get('corner_area_share'))}), on {fmt(block.get('n_images'))} of {fmt(block.get('n_available'))} "
        f"{h.escape(str(block.get('split')))} images (at most {fmt(block.get('limit'))}). Flagged: more than "
        f"{fmt(block.get('level'))} x the band's area share ({pct(block.get('flag_above'))} of the evidence)."
    )
    rows = [["Mean share in the band", pct(block.get("mean_band_share"))], ["Mean share in the corners", pct(block.get("mean_corner_share"))],
            ["Images flagged", f"{fmt(block.get('n_flagged'))} ({pct(block.get('flagged_fraction'))})"]]
    flagged = block.get("n_flagged") or 0
    verdict = h.note(
        f"{flagged} image(s) draw most of their evidence from the border: look for markers, text or collimator edges there, "
        "and consider training with --border-crop 0.1." if flagged else "No image draws most of its evidence from the border.",
        css="warn" if flagged else "ok",
    )
    root = root.resolve()
    listed = [(root / str(g.get("image")), str(g.get("caption", ""))) for g in block.get("gallery") or [] if isinstance(g, dict)]
    items = [(p if p.is_relative_to(root) and p.is_file() else None, c) for p, c in listed]
    tiles = h.figures(items, css="gallery")
    gallery = f"<h3>Highest border shares (band outlined)</h3>{tiles}" if tiles else ""
    return h.section("shortcut-check", "Shortcut check", verdict + h.note(lead) + h.table(None, rows) + gallery)


def gallery_intro_html(gallery: dict[str, Any]) -> str:
    """What the gallery's heatmaps are, and how coarse: the map's cells against the input size."""
    outlines = " White outlines: the lesions, from the data's masks." if gallery.get("outlines") else ""
    intro = h.note(f"Class activation maps: where the model looked. Warm colours mark the regions that raised the score.{outlines}")
    cells, size = gallery.get("map_cells"), gallery.get("input_size")
    if isinstance(cells, list) and len(cells) == 2 and all(isinstance(c, int) and c > 0 for c in cells) and isinstance(size, int):
        names = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "cam": "CAM", "layercam": "LayerCAM"}
        method = names.get(str(gallery.get("method")), str(gallery.get("method")))
        intro += h.note(
            f"{method} on layer {gallery.get('target_layer', '?')}: a {cells[0]} x {cells[1]} map of the {size} px input, "
            f"one cell per {size / cells[1]:.0f} px, so a finding smaller than a cell cannot be outlined; "
            "train at a larger --image-size, or use --cam-method layercam (the stride-16 stage) or --output-stride 16, for finer maps."
        )
    return intro
