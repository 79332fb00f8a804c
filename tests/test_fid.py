"""FID / KID / IS statistics (ldm.metrics.fid) and feature extractors (ldm.metrics.features).

References: scipy's sqrtm for the Fréchet distance, torch-fidelity (dev dependency) for the Inception network,
FID, KID and IS. The real FID Inception weights are not available offline, so the network is compared with
torch-fidelity's on the same random weights, written in torch-fidelity's state-dict format.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import accumulation_length, assert_float32_close
from torch import nn

from ldm.metrics.features import (
    INCEPTION_WEIGHTS_FILE,
    FeatureExtractor,
    InceptionFeatures,
    build_extractor,
    inception_weights_path,
    resolve_extractor,
)
from ldm.metrics.fid import (
    FeatureStats,
    StatsAccumulator,
    cached_reference_stats,
    compute_stats,
    fid_from_stats,
    frechet_distance,
    inception_score,
    kid,
)


def _images(gen: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """uint8 [n, 3, h, w]: smooth colour blobs plus noise, so resizing and the nets see structure."""
    low = torch.rand(n, 3, 5, 5, generator=gen)
    img = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False) + 0.1 * torch.rand(n, 3, h, w,
                                                                                                 generator=gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _stats(feats: np.ndarray, name: str = "test") -> FeatureStats:
    acc = StatsAccumulator(feats.shape[1])
    acc.update({"features": torch.from_numpy(feats)})
    return acc.result({"name": name, "dim": feats.shape[1]}, {"set": name})


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    """Independent reference: the classic sqrtm(S1 S2) formula (TTUR / pytorch-fid style)."""
    from scipy import linalg

    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("n", [400, 40], ids=["full-rank", "singular-N<D"])
def test_frechet_distance_matches_scipy(n):
    rng = np.random.default_rng(n)
    d = 64
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = rng.normal(size=(n, d)) @ mix + 0.5
    b = (rng.normal(size=(n, d)) @ mix) * 1.3 + 0.2 * rng.normal(size=(n, d))
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _scipy_frechet(mu1, s1, mu2, s2)
    assert ref > 1.0
    assert ours == pytest.approx(ref, rel=1e-3)
    assert frechet_distance(mu1, s1, mu1, s1) < 1e-6


def test_fid_of_a_set_with_itself_is_zero_and_extractors_must_match():
    # N < D, ReLU-like: the case where sqrtm(S1 @ S2) leaves ~1e-4 behind (256-d keeps the decompositions quick)
    feats = np.random.default_rng(0).gamma(2.0, size=(60, 256)).astype(np.float32)
    a = _stats(feats)
    assert abs(fid_from_stats(a, a)) < 1e-6
    assert fid_from_stats(a, _stats(feats[::-1].copy())) < 1e-6  # order does not matter
    with pytest.raises(ValueError, match="vgg16.*inception|inception.*vgg16"):
        fid_from_stats(_stats(feats, "inception"), _stats(feats, "vgg16"))


def test_frechet_distance_closed_form_for_singular_covariance():
    # S2 = c^2 S1 gives FID = |mu1 - mu2|^2 + (1 - c)^2 tr S1 exactly. With N < D, S1 is singular: the formula via
    # eigenvalues of S1^(1/2) S2 S1^(1/2) loses ~1e-4 here (square roots of rounding noise); ours must not.
    feats = np.random.default_rng(9).gamma(2.0, size=(60, 256))
    mu, s = feats.mean(0), np.cov(feats, rowvar=False)
    c, shift = 1.1, np.full(256, 0.01)
    exact = shift @ shift + (1 - c) ** 2 * np.trace(s)
    assert frechet_distance(mu, s, mu + shift, c**2 * s) == pytest.approx(exact, abs=1e-8)


class _TinyExtractor(FeatureExtractor):
    """A cheap stand-in: per-channel 4x4 pooled pixels through a fixed random projection (dim 16)."""

    name, dim, resize = "tiny", 16, "adaptive-avg 4x4"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 16)
        nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(seed))
        self.freeze()

    def _features(self, x):
        return {"features": self.proj(F.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)) + 100.0}  # large mean


def test_fid_independent_of_batch_size():
    gen = torch.Generator().manual_seed(1)
    imgs_a, imgs_b = _images(gen, 250, 16, 16), _images(gen, 250, 16, 16) // 2
    ext = _TinyExtractor()
    ref = compute_stats([imgs_b], ext, "cpu", {"set": "b"}, progress=False)
    # The accumulator alone: the same float32 features in batches of 1, 250 and 37 -> float64-equal statistics.
    feats = ext(imgs_a)["features"]
    fids = []
    for bs in (1, 250, 37):
        acc = StatsAccumulator(16)
        for chunk in feats.split(bs):
            acc.update({"features": chunk})
        stats = acc.result(ext.identity(), {"set": "a"})
        assert stats.count == 250 and stats.features.shape == (250, 16)
        np.testing.assert_allclose(stats.cov, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
        fids.append(fid_from_stats(stats, ref))
    assert fids[0] > 0.1
    assert fids[1] == pytest.approx(fids[0], rel=1e-9) and fids[2] == pytest.approx(fids[0], rel=1e-9)
    # End to end the network itself may round differently per batch size (float32), nothing more.
    by_one = compute_stats(imgs_a.split(1), ext, "cpu", {"set": "a"}, progress=False)
    by_all = compute_stats([imgs_a], ext, "cpu", {"set": "a"}, progress=False)
    assert fid_from_stats(by_one, ref) == pytest.approx(fid_from_stats(by_all, ref), rel=1e-6)


# ------------------------------------------------------------------------------------ inception vs torch-fidelity
@pytest.fixture(scope="module")
def inception_pair(tmp_path_factory):
    """(ours, torch-fidelity's) FID Inception on the same random weights, saved in torch-fidelity's format."""
    tf = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    torch.manual_seed(0)
    net = InceptionFeatures().net
    for m in net.modules():  # variance-preserving random weights and BN statistics: activations stay O(1)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.normal_(0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.8, 1.2)
    nn.init.normal_(net.fc.weight, std=0.05)
    nn.init.normal_(net.fc.bias, std=0.5)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    theirs = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                            feature_extractor_weights_path=str(path))
    return build_extractor("inception", weights=path.parent), theirs  # a directory works as well as the file


def test_inception_matches_torch_fidelity(inception_pair):
    ours, theirs = inception_pair
    gen = torch.Generator().manual_seed(2)
    for imgs in (_images(gen, 3, 37, 53), _images(gen, 1, 331, 310)):  # upsampled and downsampled to 299
        out = ours(imgs)
        with torch.no_grad():
            feats, logits_unbiased, logits = theirs(imgs)
        assert out["features"].shape == (len(imgs), 2048) and out["features"].dtype == torch.float32
        assert out["logits"].shape == (len(imgs), 1008)
        assert feats.abs().mean() > 0.05 and feats.std() > 0.05  # the comparison is not between zeros
        n = accumulation_length(ours.net)  # (the resize to 299 sums a few pixels more: negligible)
        assert_float32_close(out["features"], feats, n, "features")
        assert_float32_close(out["logits"], logits_unbiased, n, "logits_unbiased")
        assert_float32_close(out["logits"] + ours.net.fc.bias, logits, n, "logits")
    ident = ours.identity()
    assert ident["name"] == "inception" and ident["dim"] == 2048 and len(ident["weights_sha256"]) == 64
    assert "299" in ident["resize"]
    with pytest.raises(TypeError, match="uint8"):
        ours(torch.rand(1, 3, 32, 32))


def test_fid_kid_is_match_torch_fidelity(inception_pair):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric

    ours, theirs = inception_pair
    gen = torch.Generator().manual_seed(3)
    set_a, set_b = _images(gen, 5, 48, 48), _images(gen, 5, 48, 48) // 3 + 80
    meta = {"set": "a"}
    sa = compute_stats(set_a.split(2), ours, "cpu", meta, progress=False)
    sb = compute_stats([set_b], ours, "cpu", {"set": "b"}, progress=False)
    assert sa.logits.shape == (5, 1008) and sa.extractor == ours.identity() and sa.meta == meta
    with torch.no_grad():
        fa, la, _ = theirs(set_a)
        fb, _, _ = theirs(set_b)
    # all 2048 features, as FID uses them (rank-deficient covariances: 5 images per set)
    ref = fid_statistics_to_metric(fid_features_to_statistics(fa.double()), fid_features_to_statistics(fb.double()),
                                   verbose=False)["frechet_inception_distance"]
    assert sa.mean.shape == (2048,) and sa.cov.shape == (2048, 2048) and ref > 1.0
    assert fid_from_stats(sa, sb) == pytest.approx(ref, rel=1e-3)
    want_is = isc_features_to_metric(la, splits=2, shuffle=False)
    got_is = inception_score(sa.logits, splits=2)
    assert got_is == pytest.approx((want_is["inception_score_mean"], want_is["inception_score_std"]), rel=1e-4)


# ------------------------------------------------------------------------------------------------------ KID, IS
def _kid_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, written out pair by pair (Binkowski et al. 2018, Eq. 2 with k = (x.y/d + 1)^3)."""
    k = lambda u, v: (u @ v / x.shape[1] + 1.0) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_references():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(4)
    a = rng.gamma(2.0, size=(60, 32))
    b = rng.gamma(2.2, size=(50, 32)) * 1.1
    mean, std = kid(a, b, subsets=1, subset_size=1000, seed=0)  # clipped to 50 of each
    assert std == 0.0
    # the first draw picks 50 of a's 60 rows; b's 50 rows are all used (MMD does not depend on their order)
    picked = a[np.random.RandomState(0).choice(60, 50, replace=False)]
    assert mean == pytest.approx(_kid_reference(picked, b), rel=1e-9)
    assert mean > 1e-3
    ours = kid(a, b, subsets=7, subset_size=20, seed=11)
    ref = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=7, kid_subset_size=20,
                                 rng_seed=11, verbose=False)
    assert ours == pytest.approx((ref["kernel_inception_distance_mean"], ref["kernel_inception_distance_std"]),
                                 rel=1e-9)
    assert ours[1] > 0
    with pytest.raises(ValueError):
        kid(a[:1], b)


def test_inception_score_matches_formula():
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=3.0, size=(40, 1008))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for chunk in np.split(p, 4):
        py = chunk.mean(0)
        scores.append(np.exp(np.mean(np.sum(chunk * (np.log(chunk) - np.log(py)), axis=1))))
    assert inception_score(logits, splits=4) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)
    # one confident class per image, 10 classes per split -> IS = 10; identical predictions -> IS = 1
    onehot = np.full((20, 1008), -1e4)
    onehot[np.arange(20), np.arange(20) % 10] = 0.0
    assert inception_score(onehot, splits=2)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(np.zeros((20, 1008)), splits=2) == pytest.approx((1.0, 0.0))


# ------------------------------------------------------------------------------------------- weights, names
def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        build_extractor("inception")
    msg = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "vgg16" in msg  # names the offline alternative without switching to it
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "elsewhere"))):
        inception_weights_path(tmp_path / "elsewhere" / INCEPTION_WEIGHTS_FILE)
    found = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    found.parent.mkdir(parents=True)
    found.write_bytes(b"")
    assert inception_weights_path() == found


def test_auto_extractor_takes_inception_when_its_file_is_found(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    with caplog.at_level("WARNING", logger="ldm.metrics.features"):
        assert resolve_extractor("auto") == "vgg16"
    assert "vgg16" in caplog.text and INCEPTION_WEIGHTS_FILE in caplog.text  # said, not silent
    with pytest.raises(FileNotFoundError, match="missing.pth"):  # a configured file that is not there
        resolve_extractor("auto", tmp_path / "missing.pth")
    found = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    found.parent.mkdir(parents=True)
    found.write_bytes(b"")
    assert resolve_extractor("auto") == "inception"
    assert resolve_extractor("vgg16") == "vgg16" and resolve_extractor("inception") == "inception"


def test_unknown_extractor_name_lists_choices():
    with pytest.raises(ValueError, match="inception.*vgg16"):
        build_extractor("clip")


# ------------------------------------------------------------------------------------------------- caching
def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    stats = _stats(rng.normal(size=(30, 8)).astype(np.float32))
    stats.logits = rng.normal(size=(30, 1008)).astype(np.float32)
    stats.meta = {"dataset": "shapes", "split": "val", "resolution": 64, "crop": [0, 1], "n": None}
    path = tmp_path / "sub" / "ref.npz"
    stats.save(path)
    back = FeatureStats.load(path)
    assert back.count == 30 and back.meta == stats.meta and back.extractor == stats.extractor
    for name in ("mean", "cov", "features", "logits"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    assert back.mean.dtype == np.float64 and back.features.dtype == np.float32
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temp files left behind
    slim = _stats(rng.normal(size=(5, 8)).astype(np.float32))
    slim.features = None
    slim.save(path)
    assert FeatureStats.load(path).features is None and FeatureStats.load(path).count == 5


def test_cached_reference_stats_reuses_only_matching(tmp_path):
    gen = torch.Generator().manual_seed(7)
    imgs = _images(gen, 12, 16, 16)
    ext, calls = _TinyExtractor(), []

    def compute_for(meta, extractor=ext):
        def compute():
            calls.append(meta)
            return compute_stats([imgs], extractor, "cpu", meta, progress=False)
        return compute

    path = tmp_path / "ref.npz"
    meta = {"dataset": "shapes", "split": "val", "resolution": (16, 16)}  # tuple: equal after the JSON round trip
    first = cached_reference_stats(path, meta, ext, compute_for(meta))
    again = cached_reference_stats(path, meta, ext, compute_for(meta))
    assert len(calls) == 1 and again.count == 12
    np.testing.assert_array_equal(again.cov, first.cov)
    other = {**meta, "split": "train"}
    cached_reference_stats(path, other, ext, compute_for(other))
    assert len(calls) == 2 and FeatureStats.load(path).meta["split"] == "train"
    ext2 = _TinyExtractor(seed=1)  # same name, other weights -> other identity
    cached_reference_stats(path, other, ext2, compute_for(other, ext2))
    assert len(calls) == 3 and FeatureStats.load(path).extractor == ext2.identity()
    path.write_bytes(b"not an npz")
    cached_reference_stats(path, other, ext2, compute_for(other, ext2))
    assert len(calls) == 4


# ---------------------------------------------------------------------------------------------------- vgg16
def test_vgg16_extractor_runs_offline_and_is_deterministic():
    ext = build_extractor("vgg16")
    gen = torch.Generator().manual_seed(8)
    imgs = _images(gen, 3, 40, 40)
    out = ext(imgs)
    feats = out["features"]
    assert set(out) == {"features"} and feats.shape == (3, 512) and feats.dtype == torch.float32
    torch.testing.assert_close(ext(imgs)["features"], feats, rtol=0, atol=0)
    assert_float32_close(ext(imgs[1:2])["features"], feats[1:2], accumulation_length(ext))  # batch of 1 vs 3
    assert (feats[0] - feats[1]).abs().max() > 1e-2 * feats.abs().max()
    ident = ext.identity()
    assert ident["name"] == "vgg16" and ident["dim"] == 512 and "224" in ident["resize"]
    assert ident["weights_sha256"] != _random_vgg_identity()
    assert not any(p.requires_grad for p in ext.parameters()) and not ext.train().training


def _random_vgg_identity() -> str:
    from ldm.metrics.features import VGG16Features

    return VGG16Features().identity()["weights_sha256"]
