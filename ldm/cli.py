"""The doors of ldm's commands: ``--help`` read from the command's own config file, and one-line errors.

Hydra's ``--help`` lists every config group in the search path (a ``sample.py --help`` showed train.py's
loggers and trainers) and no key descriptions. ``check_arguments`` instead reads the command's entry config
(``configs/<name>.yaml``): its header comment, its config groups with the options each has, and its own keys with
the comment written above each (the config files are the documentation). ``user_errors`` turns a missing required
key (``???``) or a bad input (``ValueError``, a missing file, a bad override) into one line on stderr and exit
status 1, as for any failed command), instead of a traceback; ``LDM_TRACEBACK=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) shows the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ldm.runs import RENAMED as RENAMED_KEYS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_KEY = re.compile(r"^([A-Za-z_][\w]*):\s*(.*)$")
_DEFAULT = re.compile(r"^\s+-\s+([\w/@]+)\s*:\s*([^#\s]+)?\s*(?:#\s*(.*))?$")
# exceptions that mean "the command was given something wrong" (their messages name the key or file to fix)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                PermissionError)


@dataclass
class Entry:
    name: str
    default: str
    doc: str
    choices: list[str]


def _comment_value(rest: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes or ``${...}`` is part of the value."""
    depth, quote = 0, None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), ""


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (file stems under configs/<group>/, sub-folders as ``sub/name``)."""
    folder = CONFIG_DIR / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml")) if folder.is_dir() else []


def read_entry_config(name: str) -> tuple[str, list[Entry], list[Entry]]:
    """(header, groups, keys) of ``configs/<name>.yaml``; keys of a top-level mapping are listed as ``parent.key``
    (one level); the ``hydra`` block is left out."""
    lines = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()
    header: list[str] = []
    groups: list[Entry] = []
    keys: list[Entry] = []
    pending: list[str] = []
    block, seen_key = None, False  # the top-level key whose indented lines follow
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped[1:].removeprefix(" ")  # examples keep their indentation
            (pending if seen_key else header).append(text.rstrip() if not seen_key else text.strip())
            continue
        if not stripped:
            pending = [] if seen_key else pending
            continue
        indented = line[0].isspace()
        match = _KEY.match(stripped)
        if block == "defaults" and indented and (d := _DEFAULT.match(line)):
            group, option, comment = d.groups()
            if group != "_self_" and not group.startswith(("override", "hydra")):
                groups.append(Entry(group, option or "null", " ".join([*pending, comment or ""]).strip(),
                                    group_options(group)))
        elif match and (not indented or (block not in (None, "defaults", "hydra") and line.startswith("  ")
                                         and not line.startswith("   "))):
            seen_key = True
            key, rest = match.groups()
            value, comment = _comment_value(rest)
            doc = " ".join([*pending, comment]).strip()
            if not indented:
                block = key if not value else None
            if key not in ("defaults", "hydra") and (value or indented):
                keys.append(_entry(f"{block}.{key}" if indented else key, value, doc))
            elif not indented and key not in ("defaults", "hydra") and doc:
                pending = [doc]  # a mapping's own comment goes to its first key
                continue
        pending = []
    return "\n".join(header).strip(), groups, keys


def _entry(name: str, value: str, doc: str) -> Entry:
    parsed = yaml.safe_load(value) if value and value != "???" else None
    default = "(required)" if value == "???" else (value or "null")
    return Entry(name, default, doc, ["true", "false"] if isinstance(parsed, bool) else [])


def help_text(name: str, command: str) -> str:
    header, groups, keys = read_entry_config(name)
    width = max([len(e.name) for e in groups + keys] + [8]) + 2
    out = [f"usage: {command} [key=value ...] [group=option ...]", ""]
    if header:
        out += [header, ""]
    if groups:
        out.append("config groups (group=option):")
        for g in groups:
            line = f"  {g.name:<{width}}default {g.default}; one of: {', '.join(g.choices) or '-'}"
            out += [line] + ([f"  {'':<{width}}{g.doc}"] if g.doc else [])
        out.append("")
    out.append("keys (key=value):")
    for k in keys:
        allowed = f"; one of: {', '.join(k.choices)}" if k.choices else ""
        out.append(f"  {k.name:<{width}}{'' if k.default == '(required)' else 'default '}{k.default}{allowed}")
        if k.doc:
            out.append(f"  {'':<{width}}{k.doc}")
    out += ["", f"Any key of the composed config can be set too (`{command} --cfg job` prints it); "
                f"Hydra's own options: --hydra-help."]
    return "\n".join(out)


# Keys a command no longer takes, and the key that replaced each (one way to say each thing).
RENAMED = {"train": RENAMED_KEYS, "cache": {"ckpt": "autoencoder.pretrained"}}


def check_arguments(name: str, command: str, argv: list[str] | None = None) -> None:
    """Before Hydra sees the arguments: ``-h`` / ``--help`` prints this command's help and exits 0; a removed key
    (``RENAMED``) ends the command with an error naming its replacement."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(name, command))
        sys.exit(0)
    stage2 = "stage=ldm" in argv
    for arg in argv:
        key, _, value = arg.partition("=")
        new = RENAMED.get(name, {}).get(key.lstrip("+~"))
        if new is not None:
            fail(f"{key.lstrip('+~')}= is no longer a key of {command}: pass {new}={value or '<value>'}"
                 + ("" if stage2 or name != "train" else " (with stage=ldm: it is a stage-2 key)"))
        if name == "train" and key == "experiment" and not stage2 and _stage2_recipe(value):
            fail(f"experiment={value} is a stage-2 recipe: add stage=ldm (and autoencoder.pretrained=<stage-1 "
                 "checkpoint>)")


def _stage2_recipe(option: str) -> bool:
    """Whether configs/experiment/<option>.yaml configures stage 2 (it sets the U-Net or the condition encoder)."""
    path = CONFIG_DIR / "experiment" / f"{option}.yaml"
    defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if path.is_file() else []
    return any(isinstance(d, dict) and any(k.split()[-1] in ("/unet", "/text_encoder") for k in d) for d in defaults)


def _show_traceback() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes") for v in ("LDM_TRACEBACK",
                                                                                    "HYDRA_FULL_ERROR"))


def user_errors(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a Hydra task function (under ``@hydra.main``): missing required keys and bad inputs end the
    command with ``error: ...`` on one line (exit status 1) instead of a traceback."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def task(cfg: Any) -> Any:
            from hydra.errors import InstantiationException
            from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

            try:
                return fn(cfg)
            except MissingMandatoryValue as err:  # a `???` key the command needs was not given
                if _show_traceback():
                    raise
                key = getattr(err, "full_key", None) or "?"
                fail(f"missing required key {key}: pass {key}=<value> (`{command} --help` describes every key)")
            except InstantiationException as err:  # a constructor refused a value: name the config section
                if _show_traceback() or not isinstance(err.__cause__, USER_ERRORS):
                    raise
                where = getattr(err, "full_key", None) or str(err).partition("full_key: ")[2].strip() or "config"
                fail(f"{where}: {err.__cause__}\n(set LDM_TRACEBACK=1 for the traceback)")
            except (*USER_ERRORS, OmegaConfBaseException) as err:
                if _show_traceback():
                    raise
                fail(f"{err}\n(set LDM_TRACEBACK=1 for the traceback)")

        return task

    return wrap


def fail(message: str, status: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        # Lightning's tips, and its advice to enable TF32 matmuls: under bf16/fp16-mixed the matmuls that matter run
        # in half precision anyway, and a 32-true run chose full fp32
        return not (msg.startswith("\N{ELECTRIC LIGHT BULB} Tip") or "set_float32_matmul_precision" in msg)


def quiet_lightning() -> None:
    """Drop the Lightning output a user cannot act on: advertising tips, TF32 advice, the "N module(s) in eval mode"
    warning (ldm's frozen parts are in eval mode on purpose) and a deprecation inside Lightning itself."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
