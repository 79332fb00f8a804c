"""Compose the real Hydra configs in tests, the way train.py does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")


def compose_train(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The composed `train` config with hydra's runtime values set, so every interpolation resolves."""
    return compose_entry("train", overrides, output_dir)


def compose_entry(config: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The composed entry config ``config`` (train, sample, evaluate, ...) with Hydra's runtime set, as under
    @hydra.main (outputs under ``output_dir``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config, overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    else:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = "outputs/test"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


# Settings that make a stage-1 run small enough for 2 CPU cores.
TINY_RUN = [
    "resolution=32",
    "batch_size=4",
    "data.num_workers=0",
    "data.dataset.size=16",
    "loss.perceptual.net=alex",
    "loss.discriminator.ndf=8",
    "loss.discriminator.n_layers=2",
    "trainer.accelerator=cpu",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=null",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "latent_stats_images=8",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for torchrun's rendezvous in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_entry(*argv: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, from the repository root: ``run_entry("sample.py", "steps=0")`` or
    ``run_entry("-m", "ldm.cache", "resolution=0")``. Returns the finished process (text stdout/stderr, any exit
    code); ``env`` adds environment variables (one intra-op thread unless given, for 2-core CI machines)."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


# ------------------------------------------------------------------------------- float32 parity tolerances
# Two float32 computations of the same maths (ours vs a reference implementation, another kernel, a folded or
# reordered formula) differ by rounding, and by how much depends on the machine: PyTorch picks its kernels and
# their summation order by CPU (AVX2 / AVX-512 / ...), thread count and library version. A tolerance tuned on
# one CPU fails on another, so tolerances are derived from the size of the computation instead:
#
# - one float32 rounding is a relative error of at most eps = 2**-23 (~1.2e-7);
# - an output is a chain of sums of products; summed in another order, n terms of size ~s pick up independent
#   rounding errors of random sign, ~eps * s each, which add like a random walk: ~eps * s * sqrt(n);
# - a network chains such sums and its normalisations keep activations at about the size of its output, so the
#   errors of all layers add the same way: n = the multiply-adds an output depends on along its path, about
#   depth x fan-in (``accumulation_length`` adds up the fan-in of every conv / linear layer of the modules);
# - s is the largest magnitude of the reference output, and a factor of 4 covers the maximum over many outputs
#   (the random walk's spread) and layer gains above one.
#
#   atol = 4 * eps * sqrt(n) * max|reference|
#
# Measured with the kernels of AVX-512, AVX2 and plain CPUs (ATEN_CPU_CAPABILITY, DNNL_MAX_CPU_ISA,
# MKL_ENABLE_INSTRUCTIONS), the parity tests' differences stay below 0.14 atol. A real mismatch is far larger: a
# swapped or missing weight changes outputs by O(1) of their size, and ``float32_tolerance`` refuses models so
# big that atol would exceed half of a 1e-3 relative error (n above ~1.1 million; the SD-1.5 U-Net is ~7.4e5),
# so that scaling one output layer's weights by 1.001 still fails every parity test.
FLOAT32_EPS = torch.finfo(torch.float32).eps
_MAX_RELATIVE_TOLERANCE = 5e-4


def accumulation_length(*modules: torch.nn.Module) -> int:
    """Multiply-adds along the path to one output: the sum of the fan-ins (in_channels / groups x kernel size,
    or in_features) of every convolution and linear layer of ``modules``."""
    total = 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, torch.nn.modules.conv._ConvNd):
                total += m.in_channels // m.groups * int(torch.tensor(m.kernel_size).prod())
            elif isinstance(m, torch.nn.Linear):
                total += m.in_features
    return max(total, 1)


def float32_tolerance(reference: torch.Tensor, accumulation: int) -> float:
    """Absolute tolerance for ``actual`` vs ``reference`` computed in float32 in another order (see above)."""
    rel = 4 * FLOAT32_EPS * accumulation**0.5
    assert rel <= _MAX_RELATIVE_TOLERANCE, (
        f"{accumulation} multiply-adds per output give a float32 tolerance of {rel:.2g} relative: too loose to "
        "catch a 1e-3 error; compare a smaller model or a part of it")
    return rel * float(reference.detach().abs().max())


def assert_float32_close(actual: torch.Tensor, reference: torch.Tensor, accumulation: int, what: str = "") -> None:
    """``actual`` equals ``reference`` up to ``float32_tolerance``; the message gives the error in units of it."""
    assert actual.shape == reference.shape, f"{what}: shapes {tuple(actual.shape)} vs {tuple(reference.shape)}"
    atol = float32_tolerance(reference, accumulation)
    err = float((actual.detach().double() - reference.detach().double()).abs().max())
    assert err <= atol, (f"{what} max abs difference {err:.3g} > {atol:.3g} = 4 eps sqrt({accumulation}) "
                         f"max|reference| ({err / atol:.1f}x the float32 tolerance)")
