"""The Frechet distance between Gaussians fitted to two feature sets (FID / FVD), with a bootstrap interval.

FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64 with scipy's matrix square
root, real part taken, and the population covariance (divided by n), exactly as StyleGAN-V's FVD
computes it. With fewer samples than feature dimensions a covariance is singular and the distance
is dominated by small-sample bias; `reliable_sample_count` says where that begins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Gaussian:
    mean: np.ndarray
    covariance: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> "Gaussian":
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 1:
            raise ValueError(f"features must be (n >= 1, dim), got {features.shape}")
        mean = features.mean(axis=0)
        centred = features - mean
        return cls(mean, centred.T @ centred / features.shape[0])


def frechet_distance_between(a: Gaussian, b: Gaussian) -> float:
    import warnings

    from scipy.linalg import LinAlgWarning, sqrtm

    difference = a.mean - b.mean
    with warnings.catch_warnings():
        # Singular covariances (fewer samples than features) are expected at small n; the caller says so
        # once (`reliable_sample_count`) instead of scipy once per bootstrap resample.
        warnings.simplefilter("ignore", LinAlgWarning)
        root = sqrtm(a.covariance @ b.covariance)
    value = difference @ difference + np.trace(a.covariance + b.covariance - 2 * np.real(root))
    return float(max(np.real(value), 0.0))  # rounding can leave -1e-12 for identical sets


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two (n, dim) feature sets."""
    return frechet_distance_between(Gaussian.fit(features_a), Gaussian.fit(features_b))


@dataclass(frozen=True)
class FrechetResult:
    value: float
    low: float  # 95% percentile bootstrap interval, both sets resampled with replacement
    high: float
    n_a: int
    n_b: int
    feature_dim: int
    resamples: int

    def to_json(self) -> dict:
        return asdict(self)


def frechet_with_interval(features_a: np.ndarray, features_b: np.ndarray, resamples: int = 200, seed: int = 0,
                          confidence: float = 0.95) -> FrechetResult:
    """The distance and a percentile bootstrap interval (both sets resampled independently). The
    interval shows how much the number moves with the sample; it does not remove the small-n bias."""
    features_a = np.asarray(features_a, dtype=np.float64)
    features_b = np.asarray(features_b, dtype=np.float64)
    generator = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick_a = generator.integers(0, len(features_a), len(features_a))
        pick_b = generator.integers(0, len(features_b), len(features_b))
        values.append(frechet_distance(features_a[pick_a], features_b[pick_b]))
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail]) if values else (np.nan, np.nan)
    return FrechetResult(frechet_distance(features_a, features_b), float(low), float(high), len(features_a),
                         len(features_b), features_a.shape[1], resamples)


def reliable_sample_count(feature_dim: int) -> int:
    """Samples per set below which a Frechet distance says little: a covariance of `feature_dim`
    features has full rank only from feature_dim + 1 samples."""
    return feature_dim + 1
