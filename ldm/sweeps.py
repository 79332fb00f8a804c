"""Sweeps: what a training job hands its sweeper, what it leaves in its folder, and one table per sweep.

- ``objective_value``: the number ``train.py`` returns to any Hydra sweeper (basic grid, Optuna...): the best
  (lowest) or the last value of the run's ``monitor`` metric. A failed or non-finite job returns ``None``, which
  Optuna's sweeper records as a failed trial before it goes on (``max_failure_rate`` in the presets).
- ``write_job_result``: every run leaves ``result.json`` in its folder (status, objective, final metrics, steps,
  training time, checkpoints, the command's overrides), including failed and interrupted ones.
- ``summarise``: after a multirun (``SweepSummary``, a Hydra callback in ``configs/hydra/default.yaml``) or later
  by hand (``python -m ldm.report sweep <sweep dir>``), one row per job in ``summary.csv`` / ``summary.md`` beside
  the jobs, the best row marked, and ``objective_vs_params.png``: the objective against each swept parameter.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ldm.atomic import atomic_write, atomic_write_text
from ldm.metrics.results import format_value

log = logging.getLogger("ldm.sweeps")

RESULT_FILE = "result.json"
OBJECTIVE_MODES = ("best", "last")
# what a job's status means in the table; only "completed" rows rank
STATUSES = {
    "completed": "finished; its objective counts",
    "failed": "stopped by an error (see `error`); the sweep went on",
    "non-finite": "stopped after too many non-finite steps; the sweep went on",
    "interrupted": "stopped by a signal after saving; resume or requeue continues it",
    "no result": "no result.json: still running, or killed before it could write one",
}


def objective_value(values: Sequence[tuple[int, float]], mode: str = "best") -> float | None:
    """The run's objective from its ``(step, value)`` validations of ``monitor`` (lower is better): the lowest
    finite value (``best``) or the last one (``last``, None if it is not finite); None without validations."""
    if mode not in OBJECTIVE_MODES:
        raise ValueError(f"objective={mode!r}: use one of {', '.join(OBJECTIVE_MODES)}")
    finite = [float(v) for _, v in values if math.isfinite(v)]
    if mode == "best":
        return min(finite) if finite else None
    return float(values[-1][1]) if values and math.isfinite(values[-1][1]) else None


def write_job_result(run_dir: str | os.PathLike, **record: Any) -> Path:
    """``<run_dir>/result.json`` (atomically): ``record`` plus the run's overrides from ``.hydra/overrides.yaml``."""
    run_dir = Path(run_dir)
    record = {"overrides": read_overrides(run_dir), **record}
    return atomic_write_text(run_dir / RESULT_FILE, json.dumps(record, indent=2, default=str) + "\n")


def read_overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides (``.hydra/overrides.yaml``); [] when missing or unreadable."""
    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # missing, or not YAML: the row shows no parameters rather than failing the table
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


# ----------------------------------------------------------------------------------------------- summary
def job_folders(sweep_dir: Path) -> list[Path]:
    """Folders under ``sweep_dir`` that hold a job (its ``.hydra/overrides.yaml``), numbered ones in order."""
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml") if p.parent.parent != sweep_dir}
    return sorted(found, key=lambda p: (len(p.relative_to(sweep_dir).parts), _number(p.name), str(p)))


def _number(name: str) -> float:
    return int(name) if name.isdigit() else math.inf


def _parse(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def collect(sweep_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """(one row per job, the swept keys): a row holds job, status, objective, each override's value, steps,
    training time, checkpoint, final validation metrics and the error of a failed job."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"no such sweep folder: {sweep_dir}")
    rows, params, jobs = [], [], job_folders(sweep_dir)
    for job in jobs:
        overrides = read_overrides(job)
        result = _read_result(job)
        values = dict(o.split("=", 1) for o in overrides if "=" in o)
        params.append(values)
        metrics = {k: v for k, v in (result.get("metrics") or {}).items() if k.startswith("val/")}
        last = result.get("objective_mode") == "last"  # the checkpoint the objective describes
        checkpoint = result.get("last_checkpoint") if last else result.get("best_checkpoint")
        rows.append({
            **{param_column(k): v for k, v in values.items()}, **metrics,
            "job": str(job.relative_to(sweep_dir)), "status": result.get("status", "no result"),
            "monitor": result.get("monitor"), "objective_mode": result.get("objective_mode"),
            "objective": result.get("objective"), "steps": result.get("step"),
            "train_time_s": result.get("train_time_s"),
            "checkpoint": checkpoint or result.get("last_checkpoint") or "",
            "error": result.get("error") or "", "overrides": " ".join(overrides),
        })
    keys = list(dict.fromkeys(k for p in params for k in p))
    searched = searched_keys(jobs[0]) if jobs else set()
    swept = [param_column(k) for k in keys if k in searched or len({p.get(k) for p in params}) > 1]
    return rows, swept


# a row's own columns; an override of the same name (``objective=last``) gets its column beside them
ROW_COLUMNS = ("job", "best", "status", "monitor", "objective_mode", "objective", "steps", "train_time_s",
               "checkpoint", "error", "overrides")


def param_column(key: str) -> str:
    return f"{key} (override)" if key in ROW_COLUMNS else key


def searched_keys(job: Path) -> set[str]:
    """Keys the sweeper searched (its ``params`` with a choice, range, interval or list), from the job's
    ``.hydra/hydra.yaml``; fixed values there (``key: value``) are not swept."""
    path = job / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return set()
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params") or {}
    searches = ("choice(", "range(", "interval(", "glob(", ",")
    return {str(k) for k, v in params.items() if any(m in str(v) for m in searches)}


def _read_result(job: Path) -> dict[str, Any]:
    path = job / RESULT_FILE
    if not path.is_file():
        return {}
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as err:
        return {"status": "no result", "error": f"unreadable {RESULT_FILE}: {err}"}
    if not isinstance(result, dict):
        return {"status": "no result", "error": f"{RESULT_FILE} holds a {type(result).__name__}, not a result"}
    return result


def best_row(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """Index of the completed row with the lowest finite objective; None when there is none, or when the
    objectives measure different things (another ``monitor`` or ``objective``: not comparable)."""
    done = [(i, r) for i, r in enumerate(rows) if r["status"] == "completed" and _finite(r.get("objective"))]
    if len({(r.get("monitor"), r.get("objective_mode")) for _, r in done}) > 1:
        return None
    return min((float(r["objective"]), i) for i, r in done)[1] if done else None


def _mixed(rows: Sequence[Mapping[str, Any]]) -> bool:
    return len({(r.get("monitor"), r.get("objective_mode")) for r in rows if r["status"] == "completed"}) > 1


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def summarise(sweep_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and (with a completed job and a swept parameter)
    ``objective_vs_params.png`` into ``sweep_dir``; returns their paths by kind."""
    return _summarise(Path(sweep_dir))[0]


def _summarise(sweep_dir: Path) -> tuple[dict[str, Path], str]:
    """(:func:`summarise`'s paths, a one-line verdict naming the best job)."""
    rows, swept = collect(sweep_dir)
    if not rows:
        raise ValueError(f"{sweep_dir} holds no jobs (no <job>/.hydra/overrides.yaml below it); give the folder "
                         "a multirun wrote (multirun/<stage>/<date>/<time>)")
    best = best_row(rows)
    metrics = sorted({k for r in rows for k in r if k.startswith("val/")})
    columns = ["job", "best", "status", "objective", *swept, "steps", "train_time_s", *metrics, "checkpoint",
               "error", "overrides"]
    table = [{**r, "best": "*" if i == best else ""} for i, r in enumerate(rows)]
    out = {"csv": atomic_write_text(sweep_dir / "summary.csv", _csv(columns, table)),
           "markdown": atomic_write_text(sweep_dir / "summary.md", _markdown(sweep_dir, table, swept, metrics, best))}
    if best is not None and swept:
        out["plot"] = plot_objective(sweep_dir / "objective_vs_params.png", rows, swept, best)
    verdict = (f"{len(rows)} job(s); best: job {rows[best]['job']}, objective {format_value(rows[best]['objective'])}"
               if best is not None else f"{len(rows)} job(s); no job completed with a comparable finite objective")
    return out, verdict


def _csv(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    return buffer.getvalue()


def _markdown(sweep_dir: Path, rows: list[dict[str, Any]], swept: list[str], metrics: list[str],
              best: int | None) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines = [f"# Sweep `{sweep_dir}`", "",
             f"{len(rows)} job(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". "
             + (f"Best: job {rows[best]['job']}, objective {format_value(rows[best]['objective'])}"
                + "".join(f", {k}={_fmt(_parse(str(rows[best].get(k))))}" for k in swept) + "." if best is not None
                else "Not ranked: the jobs' objectives measure different metrics (monitor / objective differ)."
                if _mixed(rows) else "No job completed with a finite objective."), ""]
    columns = ["job", "status", "objective", *swept, "steps", "train time", *metrics, "checkpoint"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for i, r in enumerate(rows):
        cells = [f"**{r['job']}** (best)" if i == best else r["job"], r["status"],
                 _fmt(r.get("objective"), bold=i == best), *(_fmt(_parse(str(r.get(k, "")))) for k in swept),
                 _fmt(r.get("steps")), _duration(r.get("train_time_s")), *(_fmt(r.get(m)) for m in metrics),
                 f"`{r['checkpoint']}`" if r["checkpoint"] else "—"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") if c else "—" for c in cells) + " |")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "Errors:", ""] + [f"- job {r['job']}: {' '.join(r['error'].split())[:400]}" for r in failed]
    return "\n".join(lines) + "\n"


def _fmt(value: Any, bold: bool = False) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float) and value != 0 and not 1e-3 <= abs(value) < 1e5:
        text = f"{value:.4g}"
    else:
        text = format_value(value) if isinstance(value, float) else str(value)
    return f"**{text}**" if bold else text


def _duration(seconds: Any) -> str:
    if not _finite(seconds):
        return "—"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"


def plot_objective(path: Path, rows: Sequence[Mapping[str, Any]], swept: Sequence[str], best: int) -> Path:
    """One panel per swept parameter: the objective of every completed job against its value (log axis for
    positive numbers spanning more than 20x), the best job as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [(i, r) for i, r in enumerate(rows) if r["status"] == "completed" and _finite(r.get("objective"))]
    ncols = min(3, len(swept))
    nrows = math.ceil(len(swept) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), dpi=110)
    FigureCanvasAgg(fig)
    what = rows[best].get("monitor")
    fig.suptitle(f"objective: {rows[best].get('objective_mode') or ''} {what} ({len(done)} completed jobs)"
                 if what else f"objective ({len(done)} completed jobs)", fontsize="medium")
    for n, key in enumerate(swept):
        ax = fig.add_subplot(nrows, ncols, n + 1)
        raw = [_parse(str(r.get(key, ""))) for _, r in done]
        numeric = all(isinstance(v, (int, float)) for v in raw)
        labels = sorted({str(v) for v in raw}) if not numeric else []
        xs = raw if numeric else [labels.index(str(v)) for v in raw]
        ys = [float(r["objective"]) for _, r in done]
        ax.scatter(xs, ys, color="tab:blue")
        for x, y, (i, _) in zip(xs, ys, done, strict=True):
            if i == best:
                ax.scatter([x], [y], marker="*", s=220, color="tab:red", zorder=3, label="best")
        if numeric and min(raw) > 0 and max(raw) / min(raw) > 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel(key)
        ax.grid(True, alpha=0.3)
        if n % ncols == 0:
            ax.set_ylabel("objective")
        if n == 0:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


class SweepSummary(Callback):
    """Hydra callback: refresh the sweep's summary after each job (a sweep cut short keeps its table) and write it
    at the end of a multirun, logging where it is and the best job. Before the sweep starts, the folder of an
    Optuna SQLite study (``hydra.sweeper.storage=sqlite:///<path>``) is created."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        storage = str(OmegaConf.select(config, "hydra.sweeper.storage", default=None) or "")
        if storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if str(config.hydra.mode) == "RunMode.MULTIRUN":
            self._write(Path(config.hydra.sweep.dir), final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(Path(config.hydra.sweep.dir), final=True)

    @staticmethod
    def _write(sweep_dir: Path, final: bool) -> None:
        try:
            paths, verdict = _summarise(sweep_dir)
        except Exception as err:  # a table must never fail a sweep
            log.warning("sweep summary of %s not written: %s", sweep_dir, err)
            return
        if final:
            log.info("sweep summary: %s (%s)", paths["markdown"], verdict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ldm.report sweep <sweep dir>``: (re)build the summary of a sweep, e.g. one that was cut short."""
    p = argparse.ArgumentParser(prog="python -m ldm.report sweep", description=main.__doc__.split(": ", 1)[1])
    p.add_argument("sweep_dir", help="the folder a multirun wrote (hydra.sweep.dir), with one folder per job")
    args = p.parse_args(argv)
    try:
        paths, verdict = _summarise(Path(args.sweep_dir))
    except ValueError as e:
        p.error(str(e))
    for path in paths.values():
        print(f"wrote {path}")
    print(verdict)
    return 0


# ----------------------------------------------------------------------------------------- train.py jobs

def in_sweep() -> bool:
    """A job of a multirun (``-m``, ``hparams_search=``, a launcher such as SLURM)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def continue_with(cfg: DictConfig) -> str:
    """The overrides that continue this run: its run_name, or in a sweep the sweep's folder."""
    if in_sweep():
        return f"hydra.sweep.dir={HydraConfig.get().sweep.dir} (a sweep job resumes its own folder)"
    if HydraConfig.initialized() and any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra):
        return f"hydra.run.dir={HydraConfig.get().run.dir} resume=auto"  # a folder given by hand, not by run_name
    return f"run_name={cfg.run_name} resume=auto"


def record_job(cfg: DictConfig, run_dir: Path, outcome: dict, status: str, metrics: dict | None = None,
               error: str | None = None) -> float | None:
    """Write the run's ``result.json`` (rank 0); returns the objective
    (``objective=best|last`` of ``monitor``)."""
    monitor, trainer = outcome.get("monitor"), outcome.get("trainer")
    values = monitor.values if monitor is not None else []
    objective = objective_value(values, str(cfg.objective)) if status == "completed" else None
    if status == "completed" and objective is None and in_sweep():  # outside a sweep nobody reads the objective
        log.warning("no finite validation value of monitor=%s: the sweeper gets no objective", cfg.monitor)
    if trainer is not None and not trainer.is_global_zero:
        return objective
    best = getattr(trainer.checkpoint_callback if trainer is not None else None, "best_model_path", "") or ""
    last = run_dir / "checkpoints" / "last.ckpt"
    final = {k: float(v) for k, v in (metrics or getattr(trainer, "callback_metrics", {})).items()}
    write_job_result(
        run_dir, status=status, objective=objective, objective_mode=str(cfg.objective), monitor=cfg.monitor,
        monitor_values=values, step=trainer.global_step if trainer is not None else None,
        train_time_s=monitor.seconds if monitor is not None else None,
        attempts=monitor.attempts if monitor is not None else 0, error=error,
        # the latest validation's metrics survive a resume that has nothing left to train
        metrics={**(monitor.last_metrics if monitor is not None else {}), **final},
        best_checkpoint=best if best and Path(best).is_file() else "",  # not a parent run's best, named here
        last_checkpoint=str(last) if last.is_file() else "")
    return objective
