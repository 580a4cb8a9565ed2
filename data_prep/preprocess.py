"""Preprocessing options (Section 5 and the datasets' usual practice).

``none`` keeps uint8 pixels (Datum.data); every other option produces float32
(Datum.float_data).  Statistics (mean, ZCA matrix) are fitted on the set the
network trains on and applied unchanged to validation/test images.  Padding
(for CIFAR-10's random translations, training sets only) is zero-padding after normalisation, so
crops of padded images see zeros = the dataset mean for mean-subtracted data.
"""

from typing import Callable, Dict

import numpy as np

from metaqnn_errors import ConfigError

PREPROCESS = ("none", "mean", "gcn", "lcn", "zca")


def fit(method: str, train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Return the transform fitted on ``train`` (N-C-H-W uint8)."""
    if method not in PREPROCESS:
        raise ConfigError(f"dataset.preprocess must be one of {', '.join(PREPROCESS)}, got {method!r}")
    if method == "none":
        return lambda x: x
    if method == "mean":
        mean = train.astype(np.float64).mean(axis=0)
        return lambda x: (x.astype(np.float64) - mean).astype(np.float32)
    if method == "gcn":
        return global_contrast_normalize
    if method == "lcn":
        return local_contrast_normalize
    return _fit_zca(train)


def global_contrast_normalize(x: np.ndarray, scale: float = 55.0, eps: float = 1e-8) -> np.ndarray:
    """Per image: subtract its mean, divide by its standard deviation (Goodfellow et al.'s scale 55)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    flat -= flat.mean(axis=1, keepdims=True)
    norm = np.sqrt((flat**2).mean(axis=1, keepdims=True))
    flat = scale * flat / np.maximum(norm, eps)
    return flat.reshape(x.shape).astype(np.float32)


def local_contrast_normalize(x: np.ndarray, sigma: float = 2.0, eps: float = 1e-4) -> np.ndarray:
    """Per channel: subtract a Gaussian-weighted local mean, divide by the local standard deviation."""
    from scipy.ndimage import gaussian_filter

    xf = x.astype(np.float64)
    spatial = (0, 0, sigma, sigma)
    centred = xf - gaussian_filter(xf, spatial)
    local_std = np.sqrt(gaussian_filter(centred**2, spatial))
    divisor = np.maximum(local_std, local_std.mean(axis=(2, 3), keepdims=True))
    return (centred / np.maximum(divisor, eps)).astype(np.float32)


def _fit_zca(train: np.ndarray, eps: float = 0.1) -> Callable[[np.ndarray], np.ndarray]:
    flat = train.reshape(len(train), -1).astype(np.float64) / 255.0
    mean = flat.mean(axis=0)
    cov = np.cov(flat - mean, rowvar=False)
    u, s, _ = np.linalg.svd(cov)
    w = (u * (1.0 / np.sqrt(s + eps))) @ u.T

    def apply(x: np.ndarray) -> np.ndarray:
        f = x.reshape(len(x), -1).astype(np.float64) / 255.0
        return ((f - mean) @ w).reshape(x.shape).astype(np.float32)

    return apply


def pad(x: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (pixels, pixels), (pixels, pixels)), mode="constant")


def describe() -> Dict[str, str]:
    return {
        "none": "uint8 pixels, as released",
        "mean": "per-pixel mean of the training set subtracted (float)",
        "gcn": "global contrast normalisation per image, scale 55 (float)",
        "lcn": "local contrast normalisation, Gaussian sigma 2 (float)",
        "zca": "ZCA whitening fitted on the training set, eps 0.1 (float)",
    }
