"""DESIGN.md rule 1: one import direction. Lightning only in ldm/lit; Hydra/OmegaConf only at the edges."""

from __future__ import annotations

import ast
from pathlib import Path

LDM = Path(__file__).resolve().parents[1] / "ldm"
# library modules allowed to touch Hydra: entry-point helpers (the cache and export commands, train.py's config checks
# and stage builders), a Hydra callback (sweeps), the commands' doors (cli)
EDGES = {"cache.py", "export.py", "sweeps.py", "cli.py", "config_checks.py", "stages.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_lightning_only_in_lit_and_hydra_only_at_edges():
    bad = []
    for path in sorted(LDM.rglob("*.py")):
        rel = path.relative_to(LDM)
        mods = _imports(path)
        if mods & {"pytorch_lightning", "lightning"} and rel.parts[0] != "lit":
            bad.append(f"{rel}: imports Lightning outside ldm/lit")
        if mods & {"hydra", "omegaconf"} and str(rel) not in EDGES:
            bad.append(f"{rel}: imports Hydra/OmegaConf inside library code")
    assert not bad, "\n".join(bad)


def test_lower_layers_do_not_import_lit():
    for sub in ("models", "losses", "diffusion", "data", "metrics"):
        for path in (LDM / sub).rglob("*.py"):
            src = path.read_text()
            assert "ldm.lit" not in src, f"{path.relative_to(LDM)} imports ldm.lit"
