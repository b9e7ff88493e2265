"""The numbers eval and bench report, in one place: PSNR and SSIM of images against a reference,
SQNR of tensors (defined with the FP8 numerics, re-exported here), Frechet distance between feature
sets, shape-world adherence, and the bytes a module really holds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sd3fp8.fp8.numerics import sqnr

__all__ = ["PSNR_CAP", "compare_images", "frechet_distance", "module_bytes", "psnr", "sqnr", "ssim", "world_scores"]

PSNR_CAP = 100.0  # dB: identical images report this instead of inf (JSON has no inf)


def psnr(reference: np.ndarray, image: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape uint8-range images (inf when identical)."""
    mse = np.mean((np.asarray(reference, np.float64) - np.asarray(image, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, size, size]


def ssim(reference: np.ndarray, image: np.ndarray, peak: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03),
    per channel on [H, W, C] images, averaged. 1.0 means identical."""
    a = torch.as_tensor(np.asarray(reference, np.float64)).permute(2, 0, 1)[:, None]  # [C, 1, H, W]
    b = torch.as_tensor(np.asarray(image, np.float64)).permute(2, 0, 1)[:, None]
    window = _gaussian_window(min(11, a.shape[-1], a.shape[-2]))
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mu_a**2
    var_b = F.conv2d(b * b, window) - mu_b**2
    cov = F.conv2d(a * b, window) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two [N, D] feature sets (the FID formula).

    Tr(sqrt(S_a S_b)) is computed as Tr(sqrt(sqrt(S_a) S_b sqrt(S_a))), a symmetric PSD form.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Frechet distance needs at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(cov_a)
    cross = np.trace(_sqrtm_psd(root_a @ cov_b @ root_a))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def compare_images(reference: Sequence[np.ndarray], images: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean PSNR (each capped at PSNR_CAP) and mean SSIM of ``images`` against ``reference``, pairwise."""
    if len(reference) != len(images) or not images:
        raise ValueError(f"{len(images)} images against {len(reference)} references: they must pair up")
    return {"psnr": float(np.mean([min(psnr(a, b), PSNR_CAP) for a, b in zip(reference, images)])),
            "ssim": float(np.mean([ssim(a, b) for a, b in zip(reference, images)]))}


def world_scores(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict:
    """Shape-world judging: per-image adherence to its caption, their mean, and the Frechet distance
    of the images' features to the world's own renders of the same captions (None for one image)."""
    from sd3fp8.miniature.judge import adherence, features
    from sd3fp8.miniature.world import parse_caption, render

    scores = [adherence(img, c) for img, c in zip(images, captions, strict=True)]
    distance = None
    if len(images) > 1:  # a distribution distance needs two or more images
        real = np.stack([features(np.asarray(render(parse_caption(c), seed=1000 + i))) for i, c in enumerate(captions)])
        distance = frechet_distance(np.stack([features(img) for img in images]), real)
    return {"adherence": float(np.mean(scores)), "adherence_per_image": scores, "frechet_distance": distance}


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: tensor subclasses (quanto, torchao) through their inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        return sum(_storage_bytes(getattr(t, name)) for name in flatten()[0])
    return t.numel() * t.element_size()


def module_bytes(module: nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers, each tensor counted once."""
    if module is None:
        return 0
    unique = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(_storage_bytes(t) for t in unique.values())
