"""Feature statistics and the distances built on them: FID, KID and Inception Score.

* FID (Heusel et al. 2017, arXiv 1706.08500, Eq. 6): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
* KID (Binkowski et al. 2018, arXiv 1801.01401, Sec. 3): unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (subset sampling as torch-fidelity does it).
* IS (Salimans et al. 2016, arXiv 1606.03498): ``exp E_x KL(p(y|x) || p(y))`` over ``splits`` chunks.

Statistics are accumulated in float64 and saved as ``.npz`` together with the feature extractor's identity
and a description of the data, so a cached reference set is reused only for the same data and network.
All maths is numpy/torch; scipy is not needed at run time.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.atomic import atomic_write_stream
from ldm.metrics.features import FeatureExtractor

logger = logging.getLogger(__name__)

_FORMAT = "ldm-feature-stats/1"


def _canonical(obj: dict) -> dict:
    """JSON round trip with sorted keys: what a dict looks like after save/load (tuples -> lists, Path -> str)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@dataclass
class FeatureStats:
    """Mean/covariance of one image set's features (float64) plus what produced them.

    ``features`` (float32 ``[N, D]``) are kept for KID, ``logits`` (float32 ``[N, 1008]``) for IS.
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int
    extractor: dict
    meta: dict
    features: np.ndarray | None = None
    logits: np.ndarray | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (temp file in the same directory, then ``os.replace``)."""
        path = Path(path)
        arrays = {
            "format": np.array(_FORMAT), "mean": np.asarray(self.mean, np.float64),
            "cov": np.asarray(self.cov, np.float64), "count": np.array(int(self.count), np.int64),
            # JSON strings become numpy unicode arrays: loadable with allow_pickle=False
            "extractor": np.array(json.dumps(self.extractor, sort_keys=True, default=str)),
            "meta": np.array(json.dumps(self.meta, sort_keys=True, default=str)),
        }
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, np.float32)
        if self.logits is not None:
            arrays["logits"] = np.asarray(self.logits, np.float32)
        # a file object, so numpy does not append ".npz" to the temporary name
        atomic_write_stream(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a file written by :meth:`save` (no pickles). ValueError if it is not one."""
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != _FORMAT:
                raise ValueError(f"{path} is not an ldm feature-statistics file ({_FORMAT})")
            return cls(
                mean=z["mean"], cov=z["cov"], count=int(z["count"]),
                extractor=json.loads(str(z["extractor"])), meta=json.loads(str(z["meta"])),
                features=z["features"] if "features" in z.files else None,
                logits=z["logits"] if "logits" in z.files else None,
            )


class StatsAccumulator:
    """Running mean and covariance of feature batches, merged per batch in float64 (Chan et al. 1979).

    Each batch's own mean and centred scatter are merged into the totals, rather than summing ``x`` and
    ``x x^T`` and subtracting at the end: that avoids cancellation when the mean is large compared with the
    spread, and the result does not depend on the batch size beyond float64 rounding.
    """

    def __init__(self, dim: int, keep_features: bool = True, keep_logits: bool = False) -> None:
        self.dim = int(dim)
        self.keep_features, self.keep_logits = keep_features, keep_logits
        self.count = 0
        self._mean: Tensor | None = None  # float64 [D], on the features' device
        self._scatter: Tensor | None = None  # float64 [D, D]: sum of (x - mean)(x - mean)^T
        self._features: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []

    def update(self, out: dict[str, Tensor]) -> None:
        """Add one batch: ``out`` as a FeatureExtractor returns it (``"features"`` ``[B, D]``, maybe ``"logits"``)."""
        feats = out["features"]
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got {tuple(feats.shape)}")
        n = feats.shape[0]
        if n == 0:
            return
        x = feats.detach().to(torch.float64)
        mean_b = x.mean(0)
        centred = x - mean_b
        scatter_b = centred.T @ centred
        if self._mean is None:
            self._mean, self._scatter = mean_b, scatter_b
        else:
            total = self.count + n
            delta = mean_b.to(self._mean.device) - self._mean
            self._mean = self._mean + delta * (n / total)
            self._scatter = self._scatter + scatter_b.to(self._mean.device) + torch.outer(delta, delta) * (
                self.count * n / total)
        self.count += n
        if self.keep_features:
            self._features.append(feats.detach().float().cpu().numpy())
        if self.keep_logits:
            if "logits" not in out:
                raise ValueError("keep_logits=True but the extractor returned no 'logits' (only inception has them)")
            self._logits.append(out["logits"].detach().float().cpu().numpy())

    def result(self, extractor: dict, meta: dict) -> FeatureStats:
        """FeatureStats with the unbiased covariance (divides by N - 1, as ``np.cov``). Needs N >= 2."""
        if self.count < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.count}")
        return FeatureStats(
            mean=self._mean.cpu().numpy(), cov=(self._scatter / (self.count - 1)).cpu().numpy(), count=self.count,
            extractor=dict(extractor), meta=dict(meta),
            features=np.concatenate(self._features) if self.keep_features else None,
            logits=np.concatenate(self._logits) if self.keep_logits else None,
        )


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    # Symmetric square root via eigh; rounding can leave tiny negative eigenvalues on a PSD matrix -> 0.
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (mu ``[D]``, sigma ``[D, D]``).

    ``tr (S1 S2)^(1/2)`` is computed as the nuclear norm (sum of singular values) of ``S2^(1/2) S1^(1/2)``:
    its singular values are the square roots of the eigenvalues of ``S1^(1/2) S2 S1^(1/2)``, which has the
    same spectrum as ``S1 S2``. Everything is symmetric/SVD in float64, so there are no complex parts to
    drop and no eps offsets, and it stays accurate for singular covariances (N < D): the FID of a set with
    itself comes out at rounding level (~1e-12), where ``sqrtm(S1 @ S2)`` leaves ~sqrt(eps) per eigenvalue.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1 or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    tr_covmean = np.linalg.svd(_psd_sqrt(s2) @ _psd_sqrt(s1), compute_uv=False).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)  # a distance; rounding may leave ~-1e-12 for identical inputs


def _check_same_extractor(a: FeatureStats, b: FeatureStats) -> None:
    if _canonical(a.extractor) != _canonical(b.extractor):
        raise ValueError(f"statistics from different feature extractors cannot be compared: "
                         f"{a.extractor.get('name')} {a.extractor} vs {b.extractor.get('name')} {b.extractor}")


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID (or the vgg16 Fréchet distance) between two statistics of the same extractor; ValueError otherwise."""
    _check_same_extractor(a, b)
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m = x.shape[0]
    # Unbiased within-set terms drop the diagonal k(x_i, x_i); the cross term keeps all m^2 pairs.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID: mean and std (ddof 0) over ``subsets`` of unbiased MMD^2 with ``(x.y / d + 1)^3``.

    feats ``[N_a, D]`` and ``[N_b, D]``. Each subset draws ``subset_size`` rows of each set without
    replacement with ``np.random.RandomState(seed)`` in torch-fidelity's order (same seed -> same subsets);
    ``subset_size`` is clipped to the smaller set. Computed in float64.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected features [N, D] of equal D, got {a.shape} and {b.shape}")
    m = min(int(subset_size), len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if m < subset_size:
        logger.info("KID subset size clipped from %d to %d (the smaller set)", subset_size, m)
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        mmds[i] = _mmd2_unbiased_poly(x, y)
    return float(mmds.mean()), float(mmds.std())


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score: mean and std (ddof 0) of ``exp(mean_x KL(p(y|x) || p(y)))`` over ``splits`` chunks.

    logits ``[N, C]`` (inception's 1008 unbiased logits), in the given order (no shuffling; chunk ``i`` is rows
    ``i*N//splits .. (i+1)*N//splits``), softmax in float64. Equals torch-fidelity's ISC with shuffle off.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim != 2 or len(z) < splits:
        raise ValueError(f"expected logits [N >= splits={splits}, C], got {tuple(z.shape)}")
    log_p = torch.log_softmax(z, dim=1)
    n, scores = len(z), []
    for i in range(splits):
        lp = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = torch.logsumexp(lp, dim=0) - np.log(len(lp))  # log of the chunk's mean p(y)
        kl = (lp.exp() * (lp - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def compute_stats(batches: Iterable[Tensor], extractor: FeatureExtractor, device: torch.device | str, meta: dict,
                  progress: bool = True, keep_features: bool = True) -> FeatureStats:
    """Run ``extractor`` on uint8 batches ``[B, 3, H, W]`` (0..255) on ``device`` and accumulate statistics.

    Logits are kept when the extractor has them (inception, for IS). Shows a tqdm bar in images/s.
    """
    extractor = extractor.to(device)
    acc = StatsAccumulator(extractor.dim, keep_features=keep_features, keep_logits=extractor.logits_dim is not None)
    start = time.perf_counter()
    with tqdm(desc=f"{extractor.name} features", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for images in batches:
            acc.update(extractor(images.to(device, non_blocking=True)))
            bar.update(int(images.shape[0]))
    logger.info("%s features of %d images in %.1f s", extractor.name, acc.count, time.perf_counter() - start)
    return acc.result(extractor.identity(), meta)


def cached_reference_stats(path: str | os.PathLike, meta: dict, extractor: FeatureExtractor,
                           compute: Callable[[], FeatureStats]) -> FeatureStats:
    """Reference statistics from ``path`` when it was made from the same data (``meta``) and the same extractor
    identity; otherwise ``compute()`` them and overwrite ``path`` atomically, logging why."""
    path = Path(path)
    want_meta, want_ext = _canonical(meta), _canonical(extractor.identity())
    if not path.is_file():
        reason = "no cached file"
    else:
        try:
            cached = FeatureStats.load(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            reason = f"unreadable ({err})"
        else:
            got_meta, got_ext = _canonical(cached.meta), _canonical(cached.extractor)
            if got_meta == want_meta and got_ext == want_ext:
                logger.info("reusing reference statistics %s (%d images)", path, cached.count)
                return cached
            reason = "; ".join(
                f"{what} differs in {sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))}"
                for what, got, want in (("meta", got_meta, want_meta), ("extractor", got_ext, want_ext))
                if got != want)
    logger.warning("recomputing reference statistics %s: %s", path, reason)
    stats = compute()
    if _canonical(stats.meta) != want_meta or _canonical(stats.extractor) != want_ext:
        raise ValueError("compute() returned statistics for other data or another extractor than requested: "
                         f"meta {stats.meta} vs {meta}, extractor {stats.extractor} vs {want_ext}")
    stats.save(path)
    return stats
