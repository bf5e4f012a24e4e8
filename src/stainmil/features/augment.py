"""Image augmentations on batches of patches, in torch (on the backbone's device).

All functions take and return RGB batches ``(B, 3, S, S)`` float in [0, 1] and are deterministic
given their explicit parameters or ``torch.Generator``:

* :func:`dihedral` — the 8 exact symmetries of the square (4 rotations x optional flip); no resampling.
* :func:`hed_jitter` — stain jitter in the H-E-DAB optical-density space (Tellez et al. 2018): each
  stain's optical density is scaled by ``alpha`` and shifted by ``beta`` (OD units: ``beta = 0.05``
  dims a white pixel by about 5%).
* :func:`train_augment` — the old pipeline's training augmentations (random resized crop, flip,
  rotation, colour jitter), batched.

Feature views (``features.views: k``): view ``v`` is ``dihedral(x, v % 8)``, plus HED jitter when
``v >= 8`` with parameters drawn per patch from a seed of the patch's own id (:func:`view_jitter`),
so a view never depends on batching, sharding or worker order.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed

N_DIHEDRAL = 8
_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)  # (3 stains, 3 RGB)
_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)  # (3 RGB, 3 stains)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry ``k`` in 0..7 of each image: rotate by ``k % 4`` quarter turns, then flip left-right if ``k >= 4``."""
    out = torch.rot90(x, k % 4, dims=(-2, -1))
    return out.flip(-1) if k % N_DIHEDRAL >= 4 else out


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Stain jitter: x (B, 3, S, S) in [0, 1]; alpha, beta (B, 3) per image and stain (H, E, DAB).

    RGB -> optical density ``-log(rgb)`` -> per-stain OD (x inverse stain matrix) -> ``od * alpha + beta``
    -> RGB. ``alpha = 1, beta = 0`` returns the image unchanged (up to float rounding).
    """
    rgb = x.clamp_min(1e-6).movedim(1, -1)                                   # (B, S, S, 3)
    hed = -torch.log(rgb) @ _HED_FROM_RGB.to(x.device)                       # (B, S, S, 3) per-stain OD
    hed = hed * alpha[:, None, None, :] + beta[:, None, None, :]
    out = torch.exp(-hed @ _RGB_FROM_HED.to(x.device))                       # exact inverse when unchanged
    return out.clamp(0, 1).movedim(-1, 1)


def view_jitter(patch_key: str, views: int, strength: float, seed: int) -> np.ndarray:
    """HED jitter parameters of each view of one patch: (views, 2, 3) = alpha, beta per stain.

    Views below 8 are exact symmetries (alpha 1, beta 0); later ones draw ``alpha ~ U(1-s, 1+s)``,
    ``beta ~ U(-s, s)`` from a generator seeded by ``seed`` and the patch key.
    """
    params = np.zeros((views, 2, 3), dtype=np.float32)
    params[:, 0] = 1.0
    if views > N_DIHEDRAL:
        rng = np.random.default_rng([seed, zlib.crc32(patch_key.encode())])
        extra = views - N_DIHEDRAL
        params[N_DIHEDRAL:, 0] = rng.uniform(1 - strength, 1 + strength, (extra, 3))
        params[N_DIHEDRAL:, 1] = rng.uniform(-strength, strength, (extra, 3))
    return params


def make_view(x: torch.Tensor, view: int, jitter: torch.Tensor) -> torch.Tensor:
    """View ``view`` of a batch: x (B, 3, S, S) in [0, 1]; jitter (B, 2, 3) from :func:`view_jitter`."""
    out = dihedral(x, view % N_DIHEDRAL)
    if view >= N_DIHEDRAL:
        out = hed_jitter(out, jitter[:, 0], jitter[:, 1])
    return out


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float, device) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * (high - low) + low).to(device)


def train_augment(x: torch.Tensor, generator: torch.Generator, crop_scale: tuple[float, float] = (0.7, 1.0),
                  hed_strength: float = 0.05, brightness: float = 0.1, contrast: float = 0.1) -> torch.Tensor:
    """The old pipeline's training augmentations, batched: x (B, 3, S, S) in [0, 1] -> same shape.

    Random resized crop (area share in ``crop_scale``, resized back to S), a random one of the 8
    flips/rotations, HED stain jitter, brightness and contrast jitter; each drawn per image.
    """
    b, _, s, _ = x.shape
    device = x.device
    # random resized crop as an affine zoom + shift (one grid_sample for the whole batch)
    zoom = _uniform(generator, (b,), *crop_scale, device).sqrt()                # side share kept
    shift = (_uniform(generator, (b, 2), -1.0, 1.0, device)) * (1 - zoom)[:, None]
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    symmetry = torch.randint(0, N_DIHEDRAL, (b,), generator=generator)
    x = torch.stack([dihedral(image, int(k)) for image, k in zip(x, symmetry)])
    if hed_strength > 0:
        alpha = _uniform(generator, (b, 3), 1 - hed_strength, 1 + hed_strength, device)
        beta = _uniform(generator, (b, 3), -hed_strength, hed_strength, device)
        x = hed_jitter(x, alpha, beta)
    gain = _uniform(generator, (b, 1, 1, 1), 1 - brightness, 1 + brightness, device)
    spread = _uniform(generator, (b, 1, 1, 1), 1 - contrast, 1 + contrast, device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * spread + mean * gain).clamp(0, 1)


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """[0, 1] RGB (B, 3, S, S) -> backbone input ``(x - mean) / std``."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def forward_images(forward, x: torch.Tensor, mean: list[float], std: list[float],
                   autocast: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """[0, 1] RGB (B, 3, S, S) -> ``forward``'s features (B, D) float32: normalised, channels_last, under
    ``autocast`` (fp16/bf16; None = fp32) on CUDA. The one way images enter a backbone (extraction, views,
    online mode)."""
    x = normalise(x, mean, std).contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=autocast or torch.float32,
                        enabled=x.device.type == "cuda" and autocast is not None):
        return forward(x).float()
