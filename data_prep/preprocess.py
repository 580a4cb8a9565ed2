"""Preprocessing options (Section 5 and the datasets' usual practice), applied chunk by chunk.

``none`` keeps uint8 pixels (Datum.data); every other option produces float32
(Datum.float_data).  Statistics (mean, ZCA matrix) are fitted on the set the
network trains on and applied unchanged to validation/test images.  Padding
(for CIFAR-10's random translations, training sets only) is zero-padding after normalisation, so
crops of padded images see zeros = the dataset mean for mean-subtracted data.

Everything here works on chunks of images so that paper-size sets fit in memory (issue 25): a
float64 copy of SVHN's 604,388 training images is 15 GB, and LCN made several.  The statistics
are streamed in one pass (:class:`PixelStats`) and every transform maps a uint8 chunk to a
float32 chunk on its own, so the peak is one chunk's temporaries plus the uint8 release.
"""

from typing import Callable, Dict, Iterable, Iterator, Optional, Union

import numpy as np

from metaqnn_errors import ConfigError

PREPROCESS = ("none", "mean", "gcn", "lcn", "zca")
# Images per chunk: 4,096 32x32x3 images are 100 MB as float64, and LCN holds about six such
# arrays at once; BLAS is as fast on 4,096-row blocks as on the whole set (see docs/deviations.md).
CHUNK_SIZE = 4096

Transform = Callable[[np.ndarray], np.ndarray]


def iter_chunks(images: np.ndarray, size: int = CHUNK_SIZE, rows: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
    """C-contiguous chunks of ``images`` (or of ``images[rows]``, in the order of ``rows``).

    ``images`` may be a strided view (SVHN's reader returns its .mat array transposed, not
    copied): only one chunk at a time is made contiguous, never the whole set.
    """
    if size <= 0:
        raise ValueError(f"chunk size must be positive, got {size}")
    n = len(images) if rows is None else len(rows)
    for start in range(0, n, size):
        if rows is None:
            yield np.ascontiguousarray(images[start : start + size])
        else:
            yield np.ascontiguousarray(images[rows[start : start + size]])


class PixelStats:
    """Per-pixel sums of uint8 images, streamed: the mean and (``covariance``) the pixel covariance.

    The sums are exact whatever the chunking or order: the pixel sums are int64, and the Gram
    matrix sum(x x^T) is accumulated in float64 from integer pixel values whose products (at most
    255^2) and sums (at most N * 255^2 < 2^53 for N < 138 billion) are integers float64 holds
    exactly.  So the mean is bit-identical to ``train.astype(float64).mean(axis=0)`` and the
    covariance does not depend on the chunk size; the whole-array float64 copy is never made.
    """

    def __init__(self, covariance: bool = False) -> None:
        self.count = 0
        self.covariance = covariance
        self.shape: Optional[tuple] = None
        self._sum: Optional[np.ndarray] = None
        self._gram: Optional[np.ndarray] = None

    def add(self, chunk: np.ndarray) -> None:
        if chunk.dtype != np.uint8:
            raise TypeError(f"statistics are accumulated from uint8 images, got {chunk.dtype}")
        if not len(chunk):
            return
        if self._sum is None:
            self.shape = tuple(chunk.shape[1:])
            d = int(np.prod(self.shape))
            self._sum = np.zeros(d, np.int64)
            if self.covariance:
                self._gram = np.zeros((d, d), np.float64)
        elif tuple(chunk.shape[1:]) != self.shape:
            raise ValueError(f"chunk of {chunk.shape[1:]} images after {self.shape} images")
        flat = chunk.reshape(len(chunk), -1)
        self._sum += flat.sum(axis=0, dtype=np.int64)
        if self._gram is not None:
            f = flat.astype(np.float64)
            self._gram += f.T @ f  # numpy calls syrk for a.T @ a; exact, see the class docstring
        self.count += len(chunk)

    def _need(self, at_least: int) -> None:
        if self.count < at_least:
            raise ValueError(f"statistics need at least {at_least} images, got {self.count}")

    def mean(self) -> np.ndarray:
        """Per-pixel mean (float64, C-H-W), correctly rounded from the exact sum."""
        self._need(1)
        assert self._sum is not None and self.shape is not None
        return (self._sum.astype(np.float64) / self.count).reshape(self.shape)

    def cov(self) -> np.ndarray:
        """Unbiased pixel covariance (float64, D x D) of the raw 0..255 values, from the exact sums."""
        self._need(2)
        if self._gram is None:
            raise ValueError("covariance was not accumulated (PixelStats(covariance=True))")
        assert self._sum is not None
        s = self._sum.astype(np.float64)
        return (self._gram - np.outer(s, s) / self.count) / (self.count - 1)


ImagesOrChunks = Union[np.ndarray, Iterable[np.ndarray]]


def _chunks_of(train: ImagesOrChunks) -> Iterable[np.ndarray]:
    return iter_chunks(train) if isinstance(train, np.ndarray) else train


def fit(method: str, train: ImagesOrChunks) -> Transform:
    """The transform fitted on ``train``: N-C-H-W uint8 images, or an iterable of such chunks.

    The returned function maps a uint8 chunk to float32 (uint8 for ``none``) one chunk at a
    time; statistics take one pass over the chunks (only for ``mean`` and ``zca``).
    """
    if method not in PREPROCESS:
        raise ConfigError(f"dataset.preprocess must be one of {', '.join(PREPROCESS)}, got {method!r}")
    if method == "none":
        return lambda x: x
    if method == "gcn":
        return global_contrast_normalize
    if method == "lcn":
        return local_contrast_normalize
    stats = PixelStats(covariance=method == "zca")
    for chunk in _chunks_of(train):
        stats.add(chunk)
    if method == "mean":
        return _mean_transform(stats.mean())
    return _zca_transform(stats)


def output_dtype(method: str) -> np.dtype:
    """What ``fit(method, ...)`` produces from uint8 images: known before the first chunk is made."""
    return np.dtype(np.uint8 if method == "none" else np.float32)


def _mean_transform(mean: np.ndarray) -> Transform:
    def apply(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float64) - mean).astype(np.float32)

    return apply


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


def _zca_transform(stats: PixelStats, eps: float = 0.1) -> Transform:
    """ZCA on pixels scaled to 0..1: W = U diag(1/sqrt(s + eps)) U^T of the covariance's SVD."""
    mean = stats.mean().reshape(-1) / 255.0
    cov = stats.cov() / (255.0 * 255.0)
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
