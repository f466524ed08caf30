"""Two processes x 4 CPU devices through launch/local.sh train exactly like one process with 8
devices; they write one checkpoint together, which a single process restores."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from reasonembed_jax.training.checkpoint import Checkpointer, abstract_like
from reasonembed_jax.training.trainer import Trainer
from train_configs import ROOT, tiny_train_config, write_config_file


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launch_scripts_parse(script):
    path = ROOT / "launch" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    shellcheck = shutil.which("shellcheck") or (beside if os.path.exists(beside) else None)
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run([shellcheck, "-x", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_two_processes_match_one_process(tmp_path):
    config = write_config_file(tmp_path / "mh_config.py", steps=4, devices=8, checkpoint_every=2,
                               log_every=1)
    work = tmp_path / "multi"
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    port = 20000 + os.getpid() % 20000
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "local.sh"), "-n", "2", "-d", "4", "-p", str(port),
         "-l", str(tmp_path / "logs"), "--", f"--config={config}", f"--workdir={work}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join((tmp_path / "logs" / f"process_{i}.log").read_text() for i in (0, 1))
    assert proc.returncode == 0, logs[-4000:]
    assert "process 1 of 2, 4 local / 8 global devices" in logs

    # The same run in this process: one process, 8 devices.
    c = tiny_train_config(steps=4, devices=8, domains=("biology", "economics"))
    c.train.checkpoint_every = 2
    single = Trainer(c, str(tmp_path / "single")).run()
    multi_losses = [json.loads(line)["loss"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(multi_losses, [h["loss"] for h in single["history"]], rtol=1e-5)

    # One checkpoint per step, written by both processes together; restore it here.
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    trainer = Trainer(c, str(tmp_path / "restore"))
    restored = Checkpointer(str(work / "checkpoints"), every=2, keep=3).restore_latest(
        abstract_like(single["state"]))
    step, state, data_state = restored
    assert step == 4 and data_state["grain"]
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(single["state"]["params"]),
                    strict=True):
        # Summation orders differ between the two layouts; through 4 Adam steps that is at most
        # 1.4e-5 of a leaf with XLA:CPU's Eigen dots (our default), 1.8e-6 with YNNPACK's.
        assert _rel(a, b) <= 5e-5
    assert trainer.mesh.size == 8
    # Process 0 wrote the export from parameters gathered across both processes.
    assert (work / "export" / "latest" / "model.safetensors").is_file()
