"""Synthetic chest-radiograph phantoms: the offline demo dataset.

The real Kermany/Kaggle pneumonia data cannot ship with the package, so the demo,
the tests and the tutorials use phantoms generated here with numpy and Pillow only.
The output mimics the Kaggle folder layout and file naming closely enough that the
same loaders, patient-level splitting and explanation checks work on both:

* ``out_dir/{train,val,test}/{NORMAL,PNEUMONIA}/*.png`` - 8-bit grayscale images;
* ``out_dir/masks/{split}/{CLASS}/<stem>.png`` - binary lesion masks (0/255) for the
  PNEUMONIA images only, kept in a parallel tree so that a scanner listing ``*.png``
  in the class folders never mistakes a mask for an image.

Images are rendered as a sum of soft anatomical "attenuation" layers on a normalised
``[-1, 1]`` grid (body, lungs, mediastinum, heart, spine, ribs, clavicles), then given a
per-image exposure, smooth low-frequency shading and Gaussian noise. Pneumonia adds 1-2
smooth consolidation opacities inside the visible lung fields; their contrast is kept
comparable to the normal variation in exposure so that mean brightness alone is a poor
classifier and a model has to look at the lungs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medtransfer.errors import ConfigError, DataError

__all__ = [
    "CLASSES",
    "SPLITS",
    "DemoSummary",
    "generate_demo_dataset",
    "lesion_mask_path",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
MASKS_DIR = "masks"
# Lung darkness varies between patients (habitus, inspiration) by as much as a lesion
# brightens a lung on average, so "brighter lungs" is no shortcut around finding the lesion.
LUNG_DEPTH = (0.24, 0.40)

_FloatArr = np.ndarray


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`generate_demo_dataset` wrote.

    ``images[split][cls]`` and ``patients[split][cls]`` hold the counts for every split
    in :data:`SPLITS` and class in :data:`CLASSES` (zero where nothing was written).
    """

    out_dir: Path
    images: dict[str, dict[str, int]] = field(default_factory=dict)
    patients: dict[str, dict[str, int]] = field(default_factory=dict)
    masks: int = 0

    @property
    def total_images(self) -> int:
        """Number of image files over all splits and classes."""
        return sum(n for per_cls in self.images.values() for n in per_cls.values())

    @property
    def total_patients(self) -> int:
        """Number of distinct synthetic patients over all splits and classes."""
        return sum(n for per_cls in self.patients.values() for n in per_cls.values())


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Lesion:
    cx: float  # centre, patient frame, normalised coordinates
    cy: float
    sx: float  # Gaussian widths along the rotated axes
    sy: float
    theta: float
    amp: float


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient anatomy; every image of the patient is a jittered copy of it."""

    lung_cx: float  # lateral offset of each lung centre from the midline
    lung_cy: float
    lung_rx: tuple[float, float]  # (right lung = image left, left lung = image right)
    lung_ry: tuple[float, float]
    lung_taper: float  # apex narrower than base, like real lungs
    heart_cx: float
    heart_cy: float
    heart_rx: float
    heart_ry: float
    body_rx: float
    rib_y0: float
    rib_step: float
    rib_curve: float
    rotation: float
    brightness: float
    lung_depth: float  # how much darker aerated lung is than soft tissue
    lesions: tuple[_Lesion, ...]


def _sigmoid(z: _FloatArr) -> _FloatArr:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # tanh form never overflows


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> _FloatArr:
    """Smooth random field in about [-1, 1]: a coarse random grid, bicubic-upsampled.

    Resampling with Pillow is deterministic and far cheaper than summing many cosines.
    """
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    return out / (np.abs(out).max() + 1e-6)


def _lung_fields(x: _FloatArr, y: _FloatArr, a: _Anatomy, edge: float) -> tuple[_FloatArr, _FloatArr]:
    """Soft lung fields (0..1) and the normalised elliptic radius of the nearer lung.

    Each lung is an ellipse whose half-width grows from apex to base, giving the
    rounded-triangle silhouette of a PA film.
    """
    fields = []
    radii = []
    for side, rx, ry in ((-1.0, a.lung_rx[0], a.lung_ry[0]), (1.0, a.lung_rx[1], a.lung_ry[1])):
        dy = (y - a.lung_cy) / ry
        width = rx * (1.0 + a.lung_taper * np.clip(dy, -1.0, 1.0))
        dx = (x - side * a.lung_cx) / width
        r = np.sqrt(dx * dx + dy * dy)
        radii.append(r)
        fields.append(_sigmoid((1.0 - r) / edge))
    return np.maximum(fields[0], fields[1]), np.minimum(radii[0], radii[1])


def _mediastinum(x: _FloatArr, y: _FloatArr, a: _Anatomy, edge: float) -> tuple[_FloatArr, _FloatArr]:
    """Central soft-tissue band and the heart shadow (bulging to the image right)."""
    xb = (x / 0.12) ** 2
    band = np.exp(-(xb * xb)) * _sigmoid((y + 0.75) / 0.05)
    hx = (x - a.heart_cx) / a.heart_rx
    hy = (y - a.heart_cy) / a.heart_ry
    heart = _sigmoid((1.0 - np.sqrt(hx * hx + hy * hy)) / edge)
    return band, heart


def _random_anatomy(rng: np.random.Generator, pneumonia: bool, virus: bool) -> _Anatomy:
    base = dict(
        lung_cx=rng.uniform(0.36, 0.42),
        lung_cy=rng.uniform(-0.06, 0.02),
        lung_rx=(rng.uniform(0.27, 0.32), rng.uniform(0.26, 0.31)),
        lung_ry=(rng.uniform(0.56, 0.64), rng.uniform(0.53, 0.61)),
        lung_taper=rng.uniform(0.25, 0.4),
        heart_cx=rng.uniform(0.07, 0.14),
        heart_cy=rng.uniform(0.28, 0.36),
        heart_rx=rng.uniform(0.26, 0.32),
        heart_ry=rng.uniform(0.2, 0.26),
        body_rx=rng.uniform(0.82, 0.92),
        rib_y0=rng.uniform(-0.75, -0.65),
        rib_step=rng.uniform(0.125, 0.15),
        rib_curve=rng.uniform(0.9, 1.3),
        rotation=rng.uniform(-0.05, 0.05),
        brightness=rng.uniform(-0.04, 0.04),
        lung_depth=rng.uniform(*LUNG_DEPTH),
        lesions=(),
    )
    if not pneumonia:
        return _Anatomy(**base)
    anatomy = _Anatomy(**base)
    # Lesion centres are drawn from the lung *core* (well inside the visible lung, away
    # from the heart), so every mask lies inside the lung fields.
    n = 64
    g = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    y, x = np.meshgrid(g, g, indexing="ij")
    _, radius = _lung_fields(x, y, anatomy, edge=0.03)
    band, heart = _mediastinum(x, y, anatomy, edge=0.03)
    core = (radius < 0.62) & (band < 0.05) & (heart < 0.05)
    candidates = np.flatnonzero(core)
    lesions = []
    for _ in range(int(rng.integers(1, 3))):
        idx = candidates[int(rng.integers(len(candidates)))]
        cy, cx = g[idx // n], g[idx % n]
        # Segmental-to-lobar consolidations (a lung zone, not a nodule): masks 10-20% of the image side.
        if virus:  # viral: larger, fainter, more diffuse
            sx, sy, amp = rng.uniform(0.16, 0.26), rng.uniform(0.16, 0.26), rng.uniform(0.21, 0.29)
        else:  # bacterial: focal, denser lobar consolidation
            sx, sy, amp = rng.uniform(0.11, 0.21), rng.uniform(0.13, 0.24), rng.uniform(0.25, 0.36)
        lesions.append(
            _Lesion(float(cx), float(cy), float(sx), float(sy), float(rng.uniform(0, np.pi)), float(amp))
        )
    return _Anatomy(**{**base, "lesions": tuple(lesions)})


def _render(rng: np.random.Generator, a: _Anatomy, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one image of a patient (uint8) and its lesion mask (bool, or None)."""
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y0, x0 = np.meshgrid(g, g, indexing="ij")
    # Per-image jitter (positioning, breathing) maps the image grid into the patient
    # frame: images of one patient are similar but never identical.
    tx, ty = rng.uniform(-0.03, 0.03, size=2)
    scale = rng.uniform(0.97, 1.03)
    rot = a.rotation + rng.uniform(-0.02, 0.02)
    c, s = float(np.cos(rot)), float(np.sin(rot))  # Python floats keep the grid float32
    x = ((x0 - tx) * c + (y0 - ty) * s) * scale
    y = (-(x0 - tx) * s + (y0 - ty) * c) * scale
    edge = 0.05

    # Torso: superellipse open towards the bottom, plus neck and shoulders.
    body = _sigmoid((1.0 - (np.abs(x / a.body_rx) ** 2.5 + np.abs((y - 0.35) / 1.25) ** 2.5)) / 0.06)
    xn = (x / 0.2) ** 2
    neck = np.exp(-(xn * xn)) * _sigmoid(-(y + 0.7) / 0.05)
    body = np.maximum(body, neck)

    lungs, _ = _lung_fields(x, y, a, edge)
    band, heart = _mediastinum(x, y, a, 0.08)  # the heart border is soft on film
    soft_tissue = np.clip(band + heart, 0.0, 1.0)
    lung_visible = lungs * (1.0 - soft_tissue)

    # Spine with vertebral bodies, visible through the mediastinum.
    xs = (x / 0.07) ** 2
    spine = np.exp(-(xs * xs * xs)) * (0.75 + 0.25 * np.cos(2 * np.pi * y / 0.11)) * body

    # Posterior ribs: arcs rising from the spine then curving down laterally. The ten
    # ribs are one periodic profile in the bent coordinate v (one exp instead of ten).
    u = np.abs(x)
    v = (y - a.rib_y0 + 0.12 - a.rib_curve * (u - 0.3) ** 2) / a.rib_step
    d = (v - np.rint(v)) * (a.rib_step / 0.028)
    ribs = np.exp(-(d * d)) * _sigmoid((u - 0.06) / 0.03) * body * (0.35 + 0.65 * lungs)
    ribs *= _sigmoid((v + 0.5) / 0.1) * _sigmoid((9.5 - v) / 0.1)  # rib count window

    # Clavicles: slanted bands across the apices.
    clav = np.exp(-(((y + 0.68 - 0.35 * (u - 0.35)) / 0.03) ** 2)) * _sigmoid((0.6 - u) / 0.04) * body

    texture = _smooth_field(rng, size, 24)  # vascular/interstitial markings
    shading = _smooth_field(rng, size, 4)  # exposure / scatter non-uniformity

    img = (
        0.05
        + 0.55 * body
        - (a.lung_depth + rng.uniform(-0.015, 0.015)) * lungs  # the film-to-film part: breathing
        + 0.26 * soft_tissue * lungs  # soft tissue hides the lung behind it
        + 0.08 * heart
        + 0.10 * spine
        + 0.07 * ribs
        + 0.08 * clav
        + 0.035 * texture * lungs
        + 0.05 * shading
        + a.brightness
    )

    mask = None
    if a.lesions:
        mask = np.zeros(x.shape, dtype=bool)
        lesion_tex = _smooth_field(rng, size, 12)
        for les in a.lesions:
            cl, sl = np.cos(les.theta), np.sin(les.theta)
            du, dv = x - les.cx, y - les.cy
            p = (du * cl + dv * sl) / les.sx
            q = (-du * sl + dv * cl) / les.sy
            # Irregular soft edge: the Gaussian exponent is modulated by a smooth field.
            opacity = np.exp(-0.5 * (p * p + q * q) * (1.0 + 0.35 * lesion_tex)) * lung_visible
            amp = les.amp * rng.uniform(0.9, 1.1)
            img = img + amp * opacity
            mask |= opacity > 0.5

    # Per-image exposure (gain, gamma) and detector noise.
    img = np.clip(img, 0.0, 1.0) * rng.uniform(0.9, 1.1)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.85, 1.15)
    img = img + rng.uniform(0.012, 0.025) * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out, mask


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Patient:
    split: str
    cls: str
    number: int
    n_images: int
    virus: bool
    seed: np.random.SeedSequence


def _validate(
    patients_per_class: int,
    images_per_patient: tuple[int, int],
    val_patients_per_class: int,
    test_patients_per_class: int,
    image_size: int,
) -> None:
    if not isinstance(patients_per_class, int) or patients_per_class < 1:
        raise ConfigError(f"patients_per_class must be an integer >= 1, got {patients_per_class!r}")
    for name, value in (
        ("val_patients_per_class", val_patients_per_class),
        ("test_patients_per_class", test_patients_per_class),
    ):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    try:
        lo, hi = (int(v) for v in images_per_patient)
    except (TypeError, ValueError):
        raise ConfigError(f"images_per_patient must be a (min, max) pair of integers, got {images_per_patient!r}") from None
    if not 1 <= lo <= hi:
        raise ConfigError(f"images_per_patient must satisfy 1 <= min <= max, got {images_per_patient!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ConfigError(f"image_size must be an integer >= 32 pixels, got {image_size!r}")


def _plan(
    rng: np.random.Generator,
    seeds: list[np.random.SeedSequence],
    per_split: dict[str, int],
    images_per_patient: tuple[int, int],
) -> list[_Patient]:
    total = 2 * sum(per_split.values())
    # Unique, shuffled patient numbers across the whole dataset so the number itself
    # leaks nothing about split or class; Kermany NORMAL ids are 4-digit when possible.
    numbers = rng.permutation(np.arange(1, total + 1)) + (100 if total < 9000 else 0)
    patients = []
    i = 0
    for split in SPLITS:
        for cls in CLASSES:
            for _ in range(per_split[split]):
                # The real val split is tiny with one image per patient; mirror that.
                n_img = 1 if split == "val" else int(rng.integers(images_per_patient[0], images_per_patient[1] + 1))
                virus = bool(rng.random() < 0.4) if cls == "PNEUMONIA" else False
                patients.append(_Patient(split, cls, int(numbers[i]), n_img, virus, seeds[i]))
                i += 1
    return patients


_README = """\
Synthetic demo data generated by medtransfer (medtransfer.data.synthetic).

These are NOT real radiographs: they are procedurally generated chest-X-ray-like
phantoms for demos and tests. Generated with seed={seed}, image_size={size}.

Layout (same as the Kaggle "Chest X-Ray Images (Pneumonia)" dataset):
  train/{{NORMAL,PNEUMONIA}}/*.png   8-bit grayscale PNG images
  val/{{NORMAL,PNEUMONIA}}/*.png     deliberately tiny (one image per patient)
  test/{{NORMAL,PNEUMONIA}}/*.png

File names follow the Kermany convention:
  NORMAL:     IM-<patient:04d>-<k:04d>.png          (patient id "IM-<patient:04d>")
  PNEUMONIA:  person<patient>_bacteria_<image>.png  (patient id "person<patient>")
              person<patient>_virus_<image>.png
Each patient has one or more images and appears in exactly one split; patient
numbers are unique across the whole dataset.

Lesion masks (PNEUMONIA images only) live in a parallel tree so that folder scanners
never pick them up as images:
  masks/<split>/<CLASS>/<image stem>.png    binary 0/255, same size as the image,
                                            255 where the synthetic opacity exceeds
                                            half of its peak.

Counts (images / patients):
{counts}
"""


def generate_demo_dataset(
    out_dir: str | Path,
    *,
    patients_per_class: int = 60,
    images_per_patient: tuple[int, int] = (1, 3),
    val_patients_per_class: int = 4,
    test_patients_per_class: int = 20,
    image_size: int = 224,
    seed: int = 0,
    overwrite: bool = False,
) -> DemoSummary:
    """Write a synthetic pneumonia/normal chest-X-ray dataset in the Kaggle layout.

    Args:
        out_dir: Target folder; created if missing.
        patients_per_class: Training patients per class.
        images_per_patient: Inclusive ``(min, max)`` images per train/test patient.
        val_patients_per_class: Validation patients per class (one image each, like the
            tiny Kaggle val split).
        test_patients_per_class: Test patients per class.
        image_size: Side length of the square images in pixels.
        seed: Seed; the same seed always yields byte-identical files.
        overwrite: Replace an existing generated dataset in ``out_dir`` (only the
            ``train``, ``val``, ``test`` and ``masks`` folders and ``README.txt`` are
            removed). Without it an existing dataset is an error, so stale files are
            never mixed with new ones.

    Returns:
        A :class:`DemoSummary` with image and patient counts per split and class.

    Raises:
        ConfigError: An invalid setting.
        DataError: ``out_dir`` already holds a dataset and ``overwrite`` is false, or
            is not a folder.
    """
    _validate(patients_per_class, images_per_patient, val_patients_per_class, test_patients_per_class, image_size)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"out_dir {root} exists and is not a folder; pass a folder path")
    generated = [root / name for name in (*SPLITS, MASKS_DIR, "README.txt")]
    existing = [p for p in generated if p.exists()]
    if existing:
        if not overwrite:
            raise DataError(
                f"out_dir {root} already contains a dataset ({existing[0].name}); "
                "pass overwrite=True or choose an empty folder"
            )
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    per_split = {"train": patients_per_class, "val": val_patients_per_class, "test": test_patients_per_class}
    master = np.random.SeedSequence(seed)
    plan_seq, patients_seq = master.spawn(2)
    n_patients = 2 * sum(per_split.values())
    # One independent stream per patient: a patient's images do not depend on how many
    # images other patients got.
    patients = _plan(np.random.default_rng(plan_seq), patients_seq.spawn(n_patients), per_split, images_per_patient)

    images = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    counts_p = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    n_masks = 0
    image_counter = 0  # Kermany's pneumonia image numbers increase globally
    for s in SPLITS:
        for c in CLASSES:
            (root / s / c).mkdir(parents=True, exist_ok=True)
    for pat in patients:
        rng = np.random.default_rng(pat.seed)
        anatomy = _random_anatomy(rng, pneumonia=pat.cls == "PNEUMONIA", virus=pat.virus)
        counts_p[pat.split][pat.cls] += 1
        for k in range(1, pat.n_images + 1):
            pixels, mask = _render(rng, anatomy, image_size)
            if pat.cls == "NORMAL":
                stem = f"IM-{pat.number:04d}-{k:04d}"
            else:
                image_counter += 1
                kind = "virus" if pat.virus else "bacteria"
                stem = f"person{pat.number}_{kind}_{image_counter}"
            Image.fromarray(pixels).save(root / pat.split / pat.cls / f"{stem}.png")
            images[pat.split][pat.cls] += 1
            if mask is not None:
                mask_dir = root / MASKS_DIR / pat.split / pat.cls
                mask_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray((mask.astype(np.uint8) * 255)).save(mask_dir / f"{stem}.png")
                n_masks += 1

    counts = "\n".join(
        f"  {s:5s} {c:9s} {images[s][c]:5d} / {counts_p[s][c]:4d}" for s in SPLITS for c in CLASSES
    )
    (root / "README.txt").write_text(_README.format(seed=seed, size=image_size, counts=counts), encoding="utf-8")
    return DemoSummary(out_dir=root, images=images, patients=counts_p, masks=n_masks)


def lesion_mask_path(image_path: Path, data_root: Path) -> Path | None:
    """Return the lesion-mask file for a generated image, or None if it has none.

    ``data_root/<split>/<CLASS>/<stem>.<ext>`` maps to
    ``data_root/masks/<split>/<CLASS>/<stem>.png``. Images outside ``data_root``,
    NORMAL images and images without a mask on disk give None.
    """
    image_path, data_root = Path(image_path), Path(data_root)
    try:
        rel = image_path.resolve().relative_to(data_root.resolve())
    except ValueError:
        return None
    if len(rel.parts) != 3 or rel.parts[0] == MASKS_DIR:
        return None
    candidate = data_root / MASKS_DIR / rel.parts[0] / rel.parts[1] / f"{rel.stem}.png"
    return candidate if candidate.is_file() else None
