"""One synthetic chest radiograph (a phantom) and its lesion mask, with numpy and Pillow only.

An image is a sum of soft anatomical "attenuation" layers on a normalised ``[-1, 1]``
grid (body, lungs, mediastinum, heart, spine, ribs, clavicles), then given a per-image
exposure, smooth low-frequency shading and Gaussian noise. Pneumonia adds 1-2 smooth
consolidation opacities inside the visible lung fields; their contrast is kept comparable
to the normal variation in exposure so that mean brightness alone is a poor classifier
and a model has to look at the lungs.

A patient is an :class:`Anatomy` drawn once by :func:`random_anatomy`; each call of
:func:`render_phantom` gives another film of that patient (jittered positioning,
breathing and exposure). Everything is drawn from the generator passed in, in a fixed
order, so a seed always yields the same pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = ["LUNG_DEPTH", "Anatomy", "Lesion", "Phantom", "random_anatomy", "render_phantom"]

# Lung darkness varies between patients (habitus, inspiration) by as much as a lesion
# brightens a lung on average, so "brighter lungs" is no shortcut around finding the lesion.
LUNG_DEPTH = (0.24, 0.40)

_FloatArr = np.ndarray


@dataclass(frozen=True)
class Lesion:
    """One consolidation opacity: a rotated, irregular-edged Gaussian."""

    cx: float  # centre, patient frame, normalised coordinates
    cy: float
    sx: float  # Gaussian widths along the rotated axes
    sy: float
    theta: float
    amp: float


@dataclass(frozen=True)
class Anatomy:
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
    lesions: tuple[Lesion, ...]


@dataclass(frozen=True, eq=False)
class Phantom:
    """One rendered film.

    ``pixels``: uint8 ``(size, size)`` image. ``lesion_mask``: bool, True where a lesion's
    opacity exceeds half of its peak; None for a patient without lesions. ``lung_mask``:
    bool, the visible lung fields (lung not hidden behind the heart or mediastinum); every
    lesion mask lies inside it.
    """

    pixels: np.ndarray
    lesion_mask: np.ndarray | None
    lung_mask: np.ndarray


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


def _lung_fields(x: _FloatArr, y: _FloatArr, a: Anatomy, edge: float) -> tuple[_FloatArr, _FloatArr]:
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


def _mediastinum(x: _FloatArr, y: _FloatArr, a: Anatomy, edge: float) -> tuple[_FloatArr, _FloatArr]:
    """Central soft-tissue band and the heart shadow (bulging to the image right)."""
    xb = (x / 0.12) ** 2
    band = np.exp(-(xb * xb)) * _sigmoid((y + 0.75) / 0.05)
    hx = (x - a.heart_cx) / a.heart_rx
    hy = (y - a.heart_cy) / a.heart_ry
    heart = _sigmoid((1.0 - np.sqrt(hx * hx + hy * hy)) / edge)
    return band, heart


# --------------------------------------------------------------------------- one patient


def random_anatomy(rng: np.random.Generator, *, pneumonia: bool, virus: bool) -> Anatomy:
    """Draw one patient; a pneumonia patient gets 1-2 lesions (viral: larger and fainter)."""
    anatomy = Anatomy(
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
        return anatomy
    return dataclasses.replace(anatomy, lesions=_random_lesions(rng, anatomy, virus))


def _random_lesions(rng: np.random.Generator, anatomy: Anatomy, virus: bool) -> tuple[Lesion, ...]:
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
        lesions.append(Lesion(float(cx), float(cy), float(sx), float(sy), float(rng.uniform(0, np.pi)), float(amp)))
    return tuple(lesions)


# --------------------------------------------------------------------------- one film


class _Layers(NamedTuple):
    """Soft anatomical layers (0..1) on the patient-frame grid of one film."""

    body: _FloatArr
    lungs: _FloatArr
    heart: _FloatArr
    soft_tissue: _FloatArr
    lung_visible: _FloatArr
    spine: _FloatArr
    ribs: _FloatArr
    clavicles: _FloatArr


def render_phantom(rng: np.random.Generator, anatomy: Anatomy, size: int) -> Phantom:
    """Render one film of a patient: a ``size`` x ``size`` uint8 image, its lesion and lung masks."""
    x, y = _film_grid(rng, anatomy, size)
    layers = _layers(x, y, anatomy)
    img = _attenuation(rng, layers, anatomy, size)
    mask = None
    if anatomy.lesions:
        img, mask = _add_lesions(rng, img, x, y, anatomy.lesions, layers.lung_visible, size)
    return Phantom(pixels=_expose(rng, img), lesion_mask=mask, lung_mask=layers.lung_visible > 0.5)


def _film_grid(rng: np.random.Generator, a: Anatomy, size: int) -> tuple[_FloatArr, _FloatArr]:
    """The image grid mapped into the patient frame, float32."""
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
    return x, y


def _layers(x: _FloatArr, y: _FloatArr, a: Anatomy) -> _Layers:
    # Torso: superellipse open towards the bottom, plus neck and shoulders.
    body = _sigmoid((1.0 - (np.abs(x / a.body_rx) ** 2.5 + np.abs((y - 0.35) / 1.25) ** 2.5)) / 0.06)
    xn = (x / 0.2) ** 2
    neck = np.exp(-(xn * xn)) * _sigmoid(-(y + 0.7) / 0.05)
    body = np.maximum(body, neck)

    lungs, _ = _lung_fields(x, y, a, edge=0.05)
    band, heart = _mediastinum(x, y, a, 0.08)  # the heart border is soft on film
    soft_tissue = np.clip(band + heart, 0.0, 1.0)
    lung_visible = lungs * (1.0 - soft_tissue)

    # Spine with vertebral bodies, visible through the mediastinum.
    xs = (x / 0.07) ** 2
    spine = np.exp(-(xs * xs * xs)) * (0.75 + 0.25 * np.cos(2 * np.pi * y / 0.11)) * body
    ribs, clavicles = _bones(x, y, a, body, lungs)
    return _Layers(body, lungs, heart, soft_tissue, lung_visible, spine, ribs, clavicles)


def _bones(x: _FloatArr, y: _FloatArr, a: Anatomy, body: _FloatArr, lungs: _FloatArr) -> tuple[_FloatArr, _FloatArr]:
    """Posterior ribs and clavicles."""
    # Ribs: arcs rising from the spine then curving down laterally. The ten ribs are
    # one periodic profile in the bent coordinate v (one exp instead of ten).
    u = np.abs(x)
    v = (y - a.rib_y0 + 0.12 - a.rib_curve * (u - 0.3) ** 2) / a.rib_step
    d = (v - np.rint(v)) * (a.rib_step / 0.028)
    ribs = np.exp(-(d * d)) * _sigmoid((u - 0.06) / 0.03) * body * (0.35 + 0.65 * lungs)
    ribs *= _sigmoid((v + 0.5) / 0.1) * _sigmoid((9.5 - v) / 0.1)  # rib count window

    # Clavicles: slanted bands across the apices.
    clavicles = np.exp(-(((y + 0.68 - 0.35 * (u - 0.35)) / 0.03) ** 2)) * _sigmoid((0.6 - u) / 0.04) * body
    return ribs, clavicles


def _attenuation(rng: np.random.Generator, layers: _Layers, a: Anatomy, size: int) -> _FloatArr:
    """Weighted sum of the layers plus lung markings and exposure non-uniformity (about 0..1)."""
    texture = _smooth_field(rng, size, 24)  # vascular/interstitial markings
    shading = _smooth_field(rng, size, 4)  # exposure / scatter non-uniformity
    lungs = layers.lungs
    return (
        0.05
        + 0.55 * layers.body
        - (a.lung_depth + rng.uniform(-0.015, 0.015)) * lungs  # the film-to-film part: breathing
        + 0.26 * layers.soft_tissue * lungs  # soft tissue hides the lung behind it
        + 0.08 * layers.heart
        + 0.10 * layers.spine
        + 0.07 * layers.ribs
        + 0.08 * layers.clavicles
        + 0.035 * texture * lungs
        + 0.05 * shading
        + a.brightness
    )


def _add_lesions(
    rng: np.random.Generator,
    img: _FloatArr,
    x: _FloatArr,
    y: _FloatArr,
    lesions: tuple[Lesion, ...],
    lung_visible: _FloatArr,
    size: int,
) -> tuple[_FloatArr, np.ndarray]:
    """Add the opacities (confined to the visible lung) and return the image and lesion mask."""
    mask = np.zeros(x.shape, dtype=bool)
    lesion_tex = _smooth_field(rng, size, 12)
    for les in lesions:
        cl, sl = np.cos(les.theta), np.sin(les.theta)
        du, dv = x - les.cx, y - les.cy
        p = (du * cl + dv * sl) / les.sx
        q = (-du * sl + dv * cl) / les.sy
        # Irregular soft edge: the Gaussian exponent is modulated by a smooth field.
        opacity = np.exp(-0.5 * (p * p + q * q) * (1.0 + 0.35 * lesion_tex)) * lung_visible
        amp = les.amp * rng.uniform(0.9, 1.1)
        img = img + amp * opacity
        mask |= opacity > 0.5
    return img, mask


def _expose(rng: np.random.Generator, img: _FloatArr) -> np.ndarray:
    """Per-image exposure (gain, gamma) and detector noise, quantised to uint8."""
    img = np.clip(img, 0.0, 1.0) * rng.uniform(0.9, 1.1)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.85, 1.15)
    img = img + rng.uniform(0.012, 0.025) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
