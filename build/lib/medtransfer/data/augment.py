"""Training augmentation for radiographs: per-sample parameters, applied to a batch with torch ops.

One implementation serves both data paths. :func:`draw_params` draws each image's parameters
(one row of :data:`COLUMNS` per image, cheap scalars, drawn in the DataLoader worker under the
item's seed); :func:`augment_batch` applies a batch of rows to a batch of uint8 images:
crop, rotation, translation, scale and flip as ONE affine resampling (``affine_grid`` +
``grid_sample``), then brightness, contrast, gamma, blur or sharpening and noise by
broadcasting. On CPU a worker applies it to a batch of one; on a GPU the uint8 batch is
moved as it is and :func:`augment_batch` runs there. The same item seed gives the same
parameters, hence the same augmented image, on either path. (torchvision v2 transforms
applied to a batch would draw one set of parameters for the whole batch.)

Policies (``--augment``):

- ``light``: random resized crop, small rotation, brightness/contrast (the historical default);
- ``radiograph``: light's plus translation, scale, gamma, blur or sharpening, and noise;
- ``trivial``: TrivialAugment (Müller & Hutter 2021): per image ONE operation drawn uniformly
  from :data:`TRIVIAL_OPS`, at a uniformly drawn magnitude.

No horizontal flips unless asked (``horizontal_flip``): anatomy is lateralised (the heart is on
the left, a dextrocardia is a finding), so a flipped radiograph is an image the model never meets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["AUGMENT_ON", "COLUMNS", "POLICIES", "TRIVIAL_OPS", "Policy", "augment_batch", "draw_params", "identity_params"]

POLICIES = ("none", "light", "radiograph", "trivial")
AUGMENT_ON = ("auto", "workers", "device")  # auto: on the device when training on a GPU

COLUMNS = (
    "scale", "ratio", "cx", "cy", "angle", "tx", "ty", "zoom", "flip",  # geometry
    "brightness", "contrast", "gamma", "sigma", "detail", "noise", "noise_seed",  # intensity
)
_C = {name: i for i, name in enumerate(COLUMNS)}
_IDENTITY = dict(scale=1.0, ratio=1.0, zoom=1.0, brightness=1.0, contrast=1.0, gamma=1.0)

# Magnitudes of the operations the settings do not name (fractions of the side, of [0, 1] intensity).
TRANSLATE = 0.06
ZOOM = 0.1  # scale factor 1 +- ZOOM
GAMMA = 1.25  # gamma in [1/GAMMA, GAMMA]
BLUR_SIGMA = (0.3, 1.2)  # pixels of the output image
SHARPEN = (0.2, 1.0)  # unsharp-mask amount
NOISE_STD = (0.005, 0.03)
_SHARPEN_SIGMA = 1.0
_SEED_RANGE = 2**24  # noise seeds stay exact in float32 rows

TRIVIAL_OPS = (
    "identity", "crop", "rotate", "translate_x", "translate_y", "zoom",
    "brightness", "contrast", "gamma", "blur", "sharpen", "noise",
)


@dataclass(frozen=True)
class Policy:
    """A policy name and the magnitudes the settings give (crop_scale, rotation_degrees, ...)."""

    name: str = "light"
    crop_scale: tuple[float, float] = (0.6, 1.0)
    rotation_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    horizontal_flip: bool = False

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"augmentation policy {self.name!r}; choose one of {', '.join(POLICIES)}")


def identity_params(n: int) -> torch.Tensor:
    """Rows that leave an image as it is (apart from the resize to the output size)."""
    rows = torch.zeros(n, len(COLUMNS))
    for name, value in _IDENTITY.items():
        rows[:, _C[name]] = value
    return rows


class _Draw:
    """Uniform draws of ``n`` values from one generator (None: torch's global one)."""

    def __init__(self, n: int, generator: torch.Generator | None):
        self.n, self.generator = n, generator

    def uniform(self, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(self.n, generator=self.generator)

    def coin(self, p: float) -> torch.Tensor:
        return torch.rand(self.n, generator=self.generator) < p

    def seeds(self) -> torch.Tensor:
        return self.uniform(0, _SEED_RANGE).floor()


def draw_params(policy: Policy, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` rows of parameters (float32, n x len(COLUMNS)), each image's drawn on its own.

    Every policy draws the same number of values in the same order whatever the magnitudes,
    so a seed means the same draw when a magnitude changes.
    """
    rows = identity_params(n)
    if policy.name == "none":
        return rows
    draw = _Draw(n, generator)
    if policy.name == "trivial":
        return _draw_trivial(policy, rows, draw)
    low, high = policy.crop_scale
    rows[:, _C["scale"]] = draw.uniform(low, high)
    rows[:, _C["ratio"]] = torch.exp(draw.uniform(math.log(0.9), math.log(1.1)))
    rows[:, _C["cx"]], rows[:, _C["cy"]] = draw.uniform(-1, 1), draw.uniform(-1, 1)
    rows[:, _C["angle"]] = draw.uniform(-policy.rotation_degrees, policy.rotation_degrees)
    rows[:, _C["brightness"]] = draw.uniform(1 - policy.brightness, 1 + policy.brightness)
    rows[:, _C["contrast"]] = draw.uniform(1 - policy.contrast, 1 + policy.contrast)
    rows[:, _C["flip"]] = (draw.coin(0.5) & policy.horizontal_flip).float()
    if policy.name == "radiograph":
        _draw_radiograph(rows, draw)
    return rows


def _draw_radiograph(rows: torch.Tensor, draw: _Draw) -> None:
    """Light's draws plus translation, scale, gamma, blur or sharpening, and noise."""
    rows[:, _C["tx"]], rows[:, _C["ty"]] = draw.uniform(-TRANSLATE, TRANSLATE), draw.uniform(-TRANSLATE, TRANSLATE)
    rows[:, _C["zoom"]] = draw.uniform(1 - ZOOM, 1 + ZOOM)
    gamma = torch.exp(draw.uniform(-math.log(GAMMA), math.log(GAMMA)))
    rows[:, _C["gamma"]] = torch.where(draw.coin(0.5), gamma, 1.0)
    detail, blur_sigma, amount = draw.uniform(0, 1), draw.uniform(*BLUR_SIGMA), draw.uniform(*SHARPEN)
    blur, sharpen = detail < 0.2, detail > 0.8  # one image in five blurred, one in five sharpened
    rows[:, _C["sigma"]] = torch.where(blur, blur_sigma, torch.where(sharpen, _SHARPEN_SIGMA, 0.0))
    rows[:, _C["detail"]] = torch.where(blur, -1.0, torch.where(sharpen, amount, 0.0))
    noise = draw.uniform(*NOISE_STD)
    rows[:, _C["noise"]] = torch.where(draw.coin(0.3), noise, 0.0)
    rows[:, _C["noise_seed"]] = draw.seeds()


def _draw_trivial(policy: Policy, rows: torch.Tensor, draw: _Draw) -> torch.Tensor:
    """TrivialAugment: one operation per image, uniformly drawn, at a magnitude m ~ U(0, 1) and a random sign."""
    ops = TRIVIAL_OPS + (("flip",) if policy.horizontal_flip else ())
    op = (draw.uniform(0, 1) * len(ops)).long().clamp(max=len(ops) - 1)
    m, sign = draw.uniform(0, 1), torch.where(draw.coin(0.5), 1.0, -1.0)
    seeds = draw.seeds()
    low = policy.crop_scale[0]
    values = {  # op -> (column, value at magnitude m)
        "crop": ("scale", 1 - m * (1 - low)),
        "rotate": ("angle", sign * m * policy.rotation_degrees),
        "translate_x": ("tx", sign * m * TRANSLATE),
        "translate_y": ("ty", sign * m * TRANSLATE),
        "zoom": ("zoom", 1 + sign * m * ZOOM),
        "brightness": ("brightness", 1 + sign * m * policy.brightness),
        "contrast": ("contrast", 1 + sign * m * policy.contrast),
        "gamma": ("gamma", torch.exp(sign * m * math.log(GAMMA))),
        "blur": ("sigma", BLUR_SIGMA[0] + m * (BLUR_SIGMA[1] - BLUR_SIGMA[0])),
        "sharpen": ("detail", SHARPEN[0] + m * (SHARPEN[1] - SHARPEN[0])),
        "noise": ("noise", NOISE_STD[0] + m * (NOISE_STD[1] - NOISE_STD[0])),
        "flip": ("flip", torch.ones_like(m)),
    }
    for index, name in enumerate(ops):
        if name in values:
            column, value = values[name]
            chosen = op == index
            rows[chosen, _C[column]] = value[chosen]
    crop = op == ops.index("crop")
    cx, cy = draw.uniform(-1, 1), draw.uniform(-1, 1)
    rows[:, _C["cx"]], rows[:, _C["cy"]] = torch.where(crop, cx, 0.0), torch.where(crop, cy, 0.0)
    rows[op == ops.index("blur"), _C["detail"]] = -1.0
    rows[op == ops.index("sharpen"), _C["sigma"]] = _SHARPEN_SIGMA
    rows[:, _C["noise_seed"]] = seeds
    return rows


# --------------------------------------------------------------------------- applying rows to a batch


def augment_batch(images: torch.Tensor, params: torch.Tensor, *, size: int, extras: bool = True) -> torch.Tensor:
    """uint8 ``N x C x H x W`` images and their rows -> float32 ``N x C x size x size`` in [0, 1].

    Runs where ``images`` are (CPU or GPU), with no host synchronisation. Geometry first
    (one bilinear resampling; outside the image is black, as a radiograph's border is), then
    intensity. A source more than twice ``size`` is first shrunk with antialiasing, so that
    bilinear sampling does not alias. ``extras=False`` skips gamma, blur/sharpening and noise
    (policy ``light`` draws none of them).
    """
    params = params.to(device=images.device, dtype=torch.float32)
    x = images.float().div_(255)
    if min(x.shape[-2:]) > 2 * size:
        x = F.interpolate(x, size=(2 * size, 2 * size), mode="bilinear", antialias=True, align_corners=False)
    grid = F.affine_grid(_affine(params), [len(x), x.shape[1], size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    column = lambda name: params[:, _C[name]].view(-1, 1, 1, 1)  # noqa: E731
    x = (x * column("brightness")).clamp_(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (column("contrast") * x + (1 - column("contrast")) * mean).clamp_(0, 1)
    if not extras:
        return x
    x = _detail(x.pow(column("gamma")), params[:, _C["sigma"]], column("detail"))
    x = x + column("noise") * _hashed_normal(params[:, _C["noise_seed"]], x.shape[-2:])
    return x.clamp_(0, 1)


def _affine(params: torch.Tensor) -> torch.Tensor:
    """N x 2 x 3 matrices from output to input coordinates ([-1, 1] both ways; the images are square).

    A crop of side (w, h) (fractions of the image, area ``scale``, aspect ``ratio``) centred at
    (cx, cy) times the room left, rotated by ``angle``, magnified by ``zoom``, shifted by (tx, ty)
    fractions of the side, mirrored when ``flip``.
    """
    get = lambda name: params[:, _C[name]]  # noqa: E731
    w = torch.sqrt(get("scale") * get("ratio")).clamp(max=1.0)
    h = torch.sqrt(get("scale") / get("ratio")).clamp(max=1.0)
    angle = torch.deg2rad(get("angle"))
    cos, sin = torch.cos(angle), torch.sin(angle)
    mirror = 1 - 2 * get("flip")
    sx, sy = w * mirror / get("zoom"), h / get("zoom")
    centre_x = get("cx") * (1 - w) + 2 * get("tx")
    centre_y = get("cy") * (1 - h) + 2 * get("ty")
    row_x = torch.stack([cos * sx, -sin * sy, centre_x], dim=1)
    row_y = torch.stack([sin * sx, cos * sy, centre_y], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def _detail(x: torch.Tensor, sigma: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """``x + amount * (x - blur(x, sigma))`` per image: amount -1 blurs, > 0 sharpens, 0 leaves it."""
    radius = math.ceil(3 * max(BLUR_SIGMA[1], _SHARPEN_SIGMA))  # fixed, so no host synchronisation
    n, c, height, width = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    safe = sigma.clamp(min=1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = torch.where(sigma.view(-1, 1) > 0, kernel, (offsets == 0).to(x.dtype))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * c) x k
    flat = F.pad(x.reshape(1, n * c, height, width), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    blurred = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c).view(n, c, height, width)
    return x + amount * (x - blurred)


def _hashed_normal(seeds: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """N x 1 x H x W standard normal noise, a function of each image's seed only (Box-Muller over an
    integer hash), so the CPU and the GPU draw the same noise without a generator or a host sync.
    One channel: radiograph noise is in the luminance."""
    index = torch.arange(shape[0] * shape[1], device=seeds.device, dtype=torch.int64).view(1, 1, *shape)
    base = seeds.to(torch.int64).view(-1, 1, 1, 1) * (shape[0] * shape[1])
    u1 = ((_hash32(base + index, 0x68E31DA4) + 0.5) / 2**32).clamp_(max=1.0)
    u2 = (_hash32(base + index, 0x1B56C4E9) + 0.5) / 2**32
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def _hash32(values: torch.Tensor, salt: int) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) kept in int64 so that nothing overflows; returns float32."""
    mask = 0xFFFFFFFF
    x = (values ^ salt) & mask
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & mask
    x = ((x ^ (x >> 15)) * 0x846CA68B) & mask
    x = x ^ (x >> 16)
    return x.to(torch.float32)
