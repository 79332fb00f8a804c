"""Clusters on CPU stand-ins: SLURM jobs through submitit's local executor (signalled mid-run, requeued, equal to
uninterrupted ones), the sbatch script of hydra/launcher=slurm, two torchrun "nodes" on localhost, and the cache on
the ranks srun's variables describe.

submitit's local executor runs each job as its own process tree exactly as on SLURM (the same pickled job, the same
signal handler, the same requeue path; only ``scontrol requeue`` is replaced by the local controller restarting
the job), and two torchrun launchers on localhost stand in for two nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import compose_entry, free_port, run_entry
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from test_sweeps import ENV, JOB, ROOT, read_csv, sweep

from ldm.checkpoint import load_torch_file
from ldm.data.latent_format import read_manifest
from ldm.data.latents import LatentMemoryDataset
from ldm.distributed import first_host

# ----------------------------------------------------------------------------------------- SLURM / submitit

def submitit_job_processes(sweep_dir: Path) -> dict[str, int]:
    """{job folder name: PID} of the running jobs of a submitit-local sweep: each job's controller (whose PID names
    its folder under .submitit) runs the job as its child, which logs its run directory."""
    found = {}
    for folder in (sweep_dir / ".submitit").glob("[0-9]*"):
        log = folder / f"{folder.name}_0_log.out"
        children = Path(f"/proc/{folder.name}/task/{folder.name}/children")
        if not (log.is_file() and children.exists()):
            continue
        for line in log.read_text().splitlines():
            if "run directory: " in line:
                job = Path(line.split("run directory: ")[1].strip()).name
                pids = children.read_text().split()
                if pids:
                    found[job] = int(pids[0])
    return found


@pytest.mark.slow
def test_submitit_jobs_signalled_mid_run_are_requeued_and_match_uninterrupted_ones(tmp_path):
    """hydra/launcher=submitit_local, 2 jobs: each gets SIGUSR2 (submitit's time-limit / pre-emption signal) after
    its first validation; it saves, submitit requeues it, and the new attempt resumes in the same folder. Every
    validation and the final weights equal those of the same sweep run without interruption."""
    args = ["-m", *JOB, "trainer.max_steps=16", "module.base_learning_rate=1e-3,3e-3"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "hydra/launcher=submitit_local",
                             f"hydra.sweep.dir={cut}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **ENV})
    signalled: set[str] = set()
    deadline = time.time() + 600
    while len(signalled) < 2 and proc.poll() is None and time.time() < deadline:
        for job, pid in submitit_job_processes(cut).items():
            if job not in signalled and list((cut / job / "checkpoints").glob("best-*.ckpt")):
                os.kill(pid, signal.SIGUSR2)
                signalled.add(job)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert signalled == {"0", "1"}
    straight = tmp_path / "straight"
    sweep(args, straight)  # the basic launcher, in one process, never interrupted
    for job in ("0", "1"):
        a = json.loads((cut / job / "result.json").read_text())
        b = json.loads((straight / job / "result.json").read_text())
        assert a["status"] == b["status"] == "completed" and a["attempts"] == 2 and b["attempts"] == 1
        assert a["monitor_values"] == b["monitor_values"] and len(a["monitor_values"]) == 8
        assert a["objective"] == b["objective"]
        ca, cb = (load_torch_file(d / job / "checkpoints" / "last.ckpt") for d in (cut, straight))
        assert ca["global_step"] == cb["global_step"] and ca["state_dict"].keys() == cb["state_dict"].keys()
        for k in ca["state_dict"]:
            assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), (job, k)
    rows = read_csv(cut / "summary.csv")
    assert [r["status"] for r in rows] == ["completed", "completed"] and sum(r["best"] == "*" for r in rows) == 1


def test_slurm_launcher_preset_submits_requeueable_jobs(tmp_path, monkeypatch):
    """hydra/launcher=slurm composes, and submitit turns it into an sbatch script with the pre-emption signal, one
    task per GPU and the requested resources (the script a cluster would get; nothing is submitted here)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    compose_entry("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                  "hydra.launcher.account=proj", "hydra.launcher.gpus_per_node=4",
                                  "hydra.launcher.nodes=2", "hydra.launcher.timeout_min=600"], tmp_path)
    launcher = OmegaConf.to_container(HydraConfig.get().launcher)  # unresolved: submitit_folder names the sweep
    launcher.pop("submitit_folder"), launcher.update(name="train")
    launcher = OmegaConf.to_container(OmegaConf.create(launcher), resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["tasks_per_node"] == 4
    # what hydra-submitit-launcher's SlurmLauncher.launch hands submitit (which wants an `srun` on the PATH)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "jobs",
                                     slurm_max_num_timeout=launcher["max_num_timeout"])
    base = set(BaseQueueConf.__dataclass_fields__)
    params = {k if k in base else f"slurm_{k}": v for k, v in launcher.items()
              if k not in ("_target_", "max_num_timeout")}
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --signal=USR2@300", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=600", "#SBATCH --cpus-per-task=8", "#SBATCH --requeue"):
        assert line in script, (line, script)


@pytest.mark.slow
def test_two_nodes_through_torchrun_end_with_identical_parameters(tmp_path):
    """trainer=ddp trainer.num_nodes=2 under two torchrun launchers (one per "node", on localhost, gloo): both
    train, and every parameter is the same on both ranks at the end (RankConsistencyCheck's checksums)."""
    run = tmp_path / "run"
    port = free_port()
    args = [*JOB, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
            "trainer.precision=32-true", "trainer.benchmark=false", f"hydra.run.dir={run}"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **ENV})
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-4000:]
    checksums = json.loads((run / "rank_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    ckpt = load_torch_file(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    # 16 images over 2 ranks, batch 4: 2 batches per rank and epoch; both ranks read disjoint halves
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == 8


def test_first_host_of_a_slurm_node_list():
    assert first_host("gpu[07-09,12],cpu1") == "gpu07" and first_host("node5") == "node5"
    assert first_host("a-b[3]") == "a-b3" and first_host("") == "127.0.0.1"


@pytest.mark.slow
def test_the_cache_runs_on_srun_tasks_like_on_torchrun_ranks(stage1_ckpt, tmp_path):
    """Two processes with the variables srun gives two tasks on two nodes (no torchrun): they join one process
    group, each writes its own shards, and the cache holds every image once, as with one process."""
    args = [f"autoencoder.pretrained={stage1_ckpt}", "data.dataset.size=12", "data.dataset.val_size=4", "shard_size=4",
            "batch_size=2", "data.num_workers=0", "progress=false", "device=cpu"]
    port = str(free_port())
    tasks = []
    for rank in (0, 1):
        env = {**os.environ, **ENV, "SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank), "SLURM_STEP_NODELIST": "localhost",
               "MASTER_PORT": port}
        env.pop("RANK", None)
        tasks.append(subprocess.Popen([sys.executable, "-m", "ldm.cache", *args, f"out_dir={tmp_path / 'two'}",
                                       f"hydra.run.dir={tmp_path / f'h{rank}'}"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for task in tasks:
        _, err = task.communicate(timeout=300)
        assert task.returncode == 0, err[-4000:]
    one = run_entry("-m", "ldm.cache", *args, f"out_dir={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'h'}", **ENV)
    assert one.returncode == 0, one.stderr[-4000:]
    assert read_manifest(tmp_path / "two")["world_size"] == 2 and read_manifest(tmp_path / "one")["world_size"] == 1
    for split in ("train", "val"):
        a = {s["key"]: s for s in LatentMemoryDataset(tmp_path / "two", split)}
        b = {s["key"]: s for s in LatentMemoryDataset(tmp_path / "one", split)}
        assert a.keys() == b.keys() and len(a) == (12 if split == "train" else 4)
        for key in a:
            assert torch.equal(a[key]["mean"], b[key]["mean"]), key


def test_submitits_signal_wins_over_a_later_sigterm(tmp_path, monkeypatch):
    """SLURM may follow the pre-emption signal with SIGTERM: the run must still save and hand over to submitit's
    requeue, not stop as if cancelled."""
    from ldm.lit.resilience import TrainingState

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    state = TrainingState(tmp_path)
    assert signal.SIGUSR2 in state.signals
    state._handler(signal.SIGUSR2, None)
    state._handler(signal.SIGTERM, None)
    assert state.received == signal.SIGUSR2
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    plain = TrainingState(tmp_path)
    assert signal.SIGUSR2 not in plain.signals
    plain._handler(signal.SIGUSR1, None)
    plain._handler(signal.SIGTERM, None)
    assert plain.received == signal.SIGTERM  # outside submitit the latest signal decides, as before
