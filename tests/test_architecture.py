"""docs/architecture.md matches the tree: every file it names exists, every module under ldm/ is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_page_names_every_module_and_only_existing_files():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:ldm|configs|benchmarks|docs|tests)/[\w/.]*|[\w]+\.py)`", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "ldm").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    unnamed = sorted(m for m in modules if m not in named)
    assert not unnamed, f"docs/architecture.md does not say what these modules hold: {unnamed}"
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
