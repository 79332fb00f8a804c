"""Sweeps on real train.py runs (CPU, tiny models): the objective a sweeper gets, Optuna trials and their storage,
the per-sweep summary table, failed jobs that do not stop a sweep, re-runs into a sweep folder, and signals on
validation steps. Jobs on clusters (submitit, torchrun, srun): tests/test_clusters.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
from helpers import TINY_RUN, compose_train, run_entry

import train
from ldm.checkpoint import load_torch_file
from ldm.diffusion.objectives import training_target
from ldm.losses.diffusion import DiffusionLoss
from ldm.sweeps import objective_value, summarise

ROOT = Path(__file__).resolve().parents[1]
# a stage-1 run of a few seconds: 16 images, batch 4, validation (one batch) every 2 steps
JOB = [*TINY_RUN, "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=2", "trainer.max_steps=6",
       "callbacks.throughput=null", "trainer.deterministic=true", "loss.disc_start=2", "data.dataset.size=16"]
ENV = {"OMP_NUM_THREADS": "1"}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def logged_values(job: Path, key: str) -> list[float]:
    """Every value of ``key`` that Lightning's CSV logger wrote for the job (all versions: a resume adds one)."""
    values = []
    for path in sorted((job / "csv").glob("version_*/metrics.csv")):
        values += [float(r[key]) for r in read_csv(path) if r.get(key)]
    return values


# ------------------------------------------------------------------------------------------------ objective

def test_objective_is_the_best_or_last_finite_value():
    values = [(2, 0.5), (4, 0.3), (6, 0.4)]
    assert objective_value(values, "best") == 0.3 and objective_value(values, "last") == 0.4
    assert objective_value([(2, 0.5), (4, math.nan)], "best") == 0.5
    assert objective_value([(2, 0.5), (4, math.inf)], "last") is None  # a diverged end is not a result
    assert objective_value([], "best") is None
    with pytest.raises(ValueError, match="objective='mean'"):
        objective_value(values, "mean")


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_eps_mse_is_comparable_across_objectives(objective):
    """val/eps_mse (what the stage-2 sweep ranks) is 0 for a model that predicts its target exactly, whatever the
    target, and equals the plain MSE of a noise estimate: the same quantity for eps, v and x0 models."""
    loss = DiffusionLoss(objective=objective)
    x0 = torch.randn(6, 4, 8, 8, dtype=torch.float64)

    def exact(x_t, t):  # recovers the target from x_t and t: the noise is x_t's only unknown
        ab = loss.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return training_target(objective, x0, noise, loss.alphas_cumprod[t])

    _, logs = loss(exact, x0.float(), generator=torch.Generator().manual_seed(0))
    assert float(logs["eps_mse"]) < 1e-3
    _, logs = loss(lambda x_t, t: torch.zeros_like(x_t), x0.float(), generator=torch.Generator().manual_seed(1))
    if objective == "eps":  # predicting zero noise: the MSE is the noise's variance
        assert abs(float(logs["eps_mse"]) - 1.0) < 0.1


class SignalAt:
    """A callback (built from the config: ``+callbacks.signal_at``) that sends this process ``signum`` during the
    training step that ends at ``step``, as a cluster would at any moment."""

    def __new__(cls, step: int, signum: int = int(signal.SIGUSR1)):
        import pytorch_lightning as pl

        class _SignalAt(pl.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                if trainer.global_step == step - 1 and optimizer is trainer.optimizers[0]:
                    os.kill(os.getpid(), signum)

        return _SignalAt()


@pytest.mark.parametrize("step", [3, 4])  # 4 batches per epoch: mid-epoch, and the last step of an epoch
def test_a_signal_on_a_validation_step_keeps_that_validation(tmp_path, step):
    """A signal during a step (4: one after which a validation is due, at the end of an epoch): the run stops after
    that step's validation, and the resumed run validates where an uninterrupted run does, with the same values
    (the sweeper's objective) and ends with the same weights."""
    straight = tmp_path / "straight"
    train.train(compose_train(JOB, output_dir=straight))
    cut = tmp_path / "cut"
    with pytest.raises(train.TrainingInterrupted) as stop:
        train.train(compose_train([*JOB, "+callbacks.signal_at._target_=test_sweeps.SignalAt",
                                   f"+callbacks.signal_at.step={step}"], output_dir=cut))
    assert stop.value.step == step
    train.train(compose_train([*JOB, "resume=auto"], output_dir=cut))

    def history(run: Path) -> dict:
        return load_torch_file(run / "checkpoints" / "last.ckpt")["callbacks"]["MonitorHistory"]

    assert [s for s, _ in history(cut)["values"]] == [2, 4, 6]
    assert history(cut)["values"] == history(straight)["values"]
    assert history(cut)["attempts"] == 2 and history(straight)["attempts"] == 1
    a, b = (load_torch_file(run / "checkpoints" / "last.ckpt")["state_dict"] for run in (cut, straight))
    assert all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys()


# ------------------------------------------------------------------------------------------- sweeps, tables

def sweep(args: list[str], sweep_dir: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = run_entry("train.py", *args, f"hydra.sweep.dir={sweep_dir}", timeout=timeout, **ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_optuna_preset_runs_trials_picks_the_best_and_continues_from_its_storage(tmp_path):
    """hparams_search=optuna_autoencoder: 3 TPE trials (seeded) in two sittings sharing a SQLite study; every trial
    returns its best val/lpips, which equals the minimum Lightning logged for it; the summary ranks them."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["hparams_search=optuna_autoencoder", *JOB, f"hydra.sweeper.storage={storage}",
              "hydra.sweeper.sampler.n_startup_trials=1", "loss.disc_start=choice(0,2)"]
    sweep([*common, "hydra.sweeper.n_trials=2"], tmp_path / "first")
    sweep([*common, "hydra.sweeper.n_trials=1"], tmp_path / "second")  # the same study, continued

    study = optuna.load_study(study_name="autoencoder", storage=storage)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3
    objectives = []
    for sweep_dir, jobs in ((tmp_path / "first", 2), (tmp_path / "second", 1)):
        rows = read_csv(sweep_dir / "summary.csv")
        assert [r["job"] for r in rows] == [str(i) for i in range(jobs)]
        for row in rows:
            job = sweep_dir / row["job"]
            result = json.loads((job / "result.json").read_text())
            assert row["status"] == result["status"] == "completed" and int(row["steps"]) == 6
            assert float(row["objective"]) == result["objective"] == min(logged_values(job, "val/lpips"))
            for key in ("module.base_learning_rate", "loss.kl_weight", "loss.disc_weight", "loss.disc_start"):
                assert f"{key}={row[key]}" in result["overrides"]
            assert Path(row["checkpoint"]).is_file()
            objectives.append(float(row["objective"]))
        best = [r for r in rows if r["best"] == "*"]
        assert len(best) == 1 and float(best[0]["objective"]) == min(float(r["objective"]) for r in rows)
        assert (sweep_dir / "objective_vs_params.png").stat().st_size > 10_000
        assert "(best)" in (sweep_dir / "summary.md").read_text()
    assert sorted(t.value for t in trials) == sorted(objectives)
    assert study.best_value == min(objectives)


@pytest.mark.slow
def test_a_failed_job_is_a_row_and_the_sweep_goes_on(tmp_path):
    """A grid with jobs that diverge (learning rate 1e30: non-finite steps) or cannot start (resolution 33 with a
    factor-4 autoencoder): the sweep ends normally, every job has its row and status, and the table can be rebuilt
    by hand after the fact (here: with a job's result gone, as if it had been killed)."""
    sweep_dir = tmp_path / "grid"
    proc = sweep(["-m", *JOB, "resolution=32,33", "module.base_learning_rate=1e-3,1e30",
                  "module.max_consecutive_skips=1"], sweep_dir)
    assert (proc.stdout + proc.stderr).count("this sweep job failed; the sweep goes on") == 3
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["job"], r["status"], r["best"]) for r in rows] == [
        ("0", "completed", "*"), ("1", "non-finite", ""), ("2", "failed", ""), ("3", "failed", "")]
    assert "resolution=33 is not divisible" in rows[2]["error"] and rows[2]["objective"] == ""
    assert "steps in a row" in rows[1]["error"] and rows[1]["objective"] == ""
    assert float(rows[0]["objective"]) == min(logged_values(sweep_dir / "0", "val/lpips"))

    (sweep_dir / "1" / "result.json").unlink()
    (sweep_dir / "summary.csv").unlink()
    proc = run_entry("-m", "ldm.report", "sweep", str(sweep_dir), **ENV)
    assert proc.returncode == 0, proc.stderr
    assert "summary.md" in proc.stdout
    rows = read_csv(sweep_dir / "summary.csv")
    assert [r["status"] for r in rows] == ["completed", "no result", "failed", "failed"]
    proc = run_entry("-m", "ldm.report", "sweep", str(tmp_path / "nothing"), **ENV)
    assert proc.returncode != 0 and "no such sweep folder" in proc.stderr and "Traceback" not in proc.stderr


def test_summary_marks_non_finite_jobs_and_ranks_only_completed_ones(tmp_path):
    for job, (status, objective) in enumerate([("completed", 0.5), ("non-finite", None), ("completed", 0.25),
                                               ("interrupted", None)]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- lr={job}e-4\n- seed=0\n")
        (folder / "result.json").write_text(json.dumps({"status": status, "objective": objective, "step": 10,
                                                        "metrics": {"val/loss": objective or math.nan}}))
    paths = summarise(tmp_path)
    rows = read_csv(paths["csv"])
    assert [r["best"] for r in rows] == ["", "", "*", ""] and [r["lr"] for r in rows] == ["0e-4", "1e-4", "2e-4",
                                                                                           "3e-4"]
    assert "seed" not in rows[0]  # the same in every job: not a swept parameter
    text = paths["markdown"].read_text()
    assert "4 job(s): 2 completed, 1 non-finite, 1 interrupted" in text and "**2** (best)" in text


@pytest.mark.slow
def test_rerunning_a_sweep_resumes_its_jobs_and_refuses_foreign_ones(tmp_path):
    """Jobs started from another run's checkpoint (ckpt_path) count only their own validations; the same command
    again in the same sweep folder (what a requeue or a restarted sweep does) continues each job from its own
    folder, not from ckpt_path, and keeps its result; a different sweep sent into that folder is refused job by
    job without touching the earlier results. objective=last ranks the jobs by their last value."""
    parent = tmp_path / "parent"
    train.train(compose_train([*JOB, "trainer.max_steps=4"], output_dir=parent))
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *JOB, "objective=last", f"ckpt_path={parent / 'checkpoints' / 'last.ckpt'}",
            "module.base_learning_rate=1e-3,2e-3"]
    sweep(args, sweep_dir)
    first = [json.loads((sweep_dir / j / "result.json").read_text()) for j in ("0", "1")]
    for result in first:
        assert result["status"] == "completed" and result["step"] == 6 and result["attempts"] == 1
        assert [s for s, _ in result["monitor_values"]] == [6]  # not the parent's validations at steps 2 and 4
        assert result["objective"] == result["monitor_values"][-1][1]
        assert result["best_checkpoint"] == "" or Path(result["best_checkpoint"]).is_file()
    rows = read_csv(sweep_dir / "summary.csv")
    assert [float(r["objective"]) for r in rows] == [r["objective"] for r in first]
    assert sum(r["best"] == "*" for r in rows) == 1  # the override objective=last does not hide the values
    assert all(r["checkpoint"].endswith("last.ckpt") for r in rows)

    sweep(args, sweep_dir)  # again: each job resumes its own last.ckpt (at max_steps: nothing left to train)
    for job, before in zip(("0", "1"), first, strict=True):
        after = json.loads((sweep_dir / job / "result.json").read_text())
        assert after["status"] == "completed" and after["objective"] == before["objective"]
        assert after["metrics"]["val/lpips"] == before["metrics"]["val/lpips"]

    proc = sweep(["-m", *JOB, "module.base_learning_rate=5e-3,1e-3"], sweep_dir)
    assert (proc.stdout + proc.stderr).count("holds a checkpoint of another run") == 2
    for job, before in zip(("0", "1"), first, strict=True):
        assert json.loads((sweep_dir / job / "result.json").read_text())["objective"] == before["objective"]


def test_settings_a_sweep_cannot_rank_are_refused_before_any_work(tmp_path):
    for overrides, message in ((["objective=mean"], "objective='mean'"), (["monitor=val/psnr"], "higher-is-better")):
        with pytest.raises(ValueError, match=message):
            train.train(compose_train([*JOB, *overrides], output_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_summary_survives_odd_jobs_and_does_not_rank_different_metrics(tmp_path):
    jobs = [({"status": "completed", "objective": 0.3, "monitor": "val/lpips", "objective_mode": "best"},
             "- monitor=val/lpips\n- status=x\n"),
            ({"status": "completed", "objective": 0.1, "monitor": "val/rec_loss", "objective_mode": "best"},
             "- monitor=val/rec_loss\n- status=y\n"),
            ([1, 2], "- monitor=val/lpips\n- status=z\n"),
            ({"status": "completed", "objective": 0.2}, "{not: [yaml")]
    for job, (result, overrides) in enumerate(jobs):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(overrides)
        (folder / "result.json").write_text(json.dumps(result))
    paths = summarise(tmp_path)
    rows = read_csv(paths["csv"])
    assert [r["status"] for r in rows] == ["completed", "completed", "no result", "completed"]
    assert [r["objective"] for r in rows] == ["0.3", "0.1", "", "0.2"]  # overrides named like a column do not
    assert rows[0]["status (override)"] == "x"                          # replace the job's own values
    assert not any(r["best"] for r in rows)  # val/lpips and val/rec_loss (and an unknown one) are not comparable
    assert "Not ranked" in paths["markdown"].read_text()


def test_outside_a_sweep_a_changed_resume_from_the_runs_own_checkpoint_is_still_applied(tmp_path):
    """The any-change refusal is for a sweep job finding its folder taken; a single run resumed with ckpt_path
    from its own folder still applies (and records) a changed learning rate."""
    run = tmp_path / "run"
    train.train(compose_train([*JOB, "trainer.max_steps=2"], output_dir=run))
    train.train(compose_train([*JOB, "trainer.max_steps=4", "module.base_learning_rate=1e-4",
                               f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], output_dir=run))
    history = load_torch_file(run / "checkpoints" / "last.ckpt")["ldm"]["history"]
    assert history[-1]["changes"]["module.base_learning_rate"][1] == 1e-4
