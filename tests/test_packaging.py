"""pyproject.toml and environment.yml must list the same dependencies with the same version ranges."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", req).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"])
    pip_lines = []
    in_pip = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.strip() == "- pip:":
            in_pip = True
            continue
        if in_pip and line.strip().startswith("- ") and not line.strip().startswith("- -e"):
            pip_lines.append(line.strip()[2:])
    listed = dict(_norm(r) for r in pip_lines)
    assert listed == wanted, (
        f"only in pyproject: {sorted(set(wanted.items()) - set(listed.items()))}; "
        f"only in environment.yml: {sorted(set(listed.items()) - set(wanted.items()))}"
    )


def test_python_floor_is_310():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
