"""The train CLI end to end: overrides, dry run, SIGKILL + resume equals an
uninterrupted run, and the first-step loss against sentence-transformers' MNRL."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from safetensors.numpy import load_file

from reasonembed_jax.text import format_query
from reasonembed_jax.training.trainer import Trainer
from train_configs import ROOT, tiny_train_config, write_config_file


def _env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")


def _train_cmd(config, workdir, *extra):
    return [sys.executable, "-m", "reasonembed_jax.train", f"--config={config}",
            f"--workdir={workdir}", *extra]


def test_unknown_override_is_an_error_naming_the_key(tmp_path):
    proc = subprocess.run(_train_cmd("configs/demo.py", tmp_path, "--config.optim.learnin_rate=1"),
                          capture_output=True, text=True, cwd=ROOT, env=_env(1), timeout=300)
    assert proc.returncode != 0
    assert "learnin_rate" in proc.stderr


def test_a_misspelt_variant_is_an_error_naming_it(tmp_path):
    proc = subprocess.run(_train_cmd("configs/demo.py:lora,gradcahce", tmp_path),
                          capture_output=True, text=True, cwd=ROOT, env=_env(1), timeout=300)
    assert proc.returncode != 0
    assert "'gradcahce'" in proc.stderr and "takes lora, gradcache" in proc.stderr


def test_dry_run_prints_memory_plan_without_weights():
    proc = subprocess.run(
        [sys.executable, "-m", "reasonembed_jax.train", "--config=configs/reasonembed_qwen3_8b.py",
         "--dry_run", "--config.model.hf_dir=" + str(ROOT.parent / "shared/data/hf_configs/Qwen3-0.6B"),
         "--config.data.query_max_length=32", "--config.data.passage_max_length=32",
         "--config.data.reasoning_max_length=32"],
        capture_output=True, text=True, cwd=ROOT, env=_env(2), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "domain leetcode" in proc.stdout and "GiB/device" in proc.stdout
    assert "data.query_max_length: 512 -> 32" in proc.stdout  # the differences come first


def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
    config = write_config_file(tmp_path / "resume_config.py", steps=12, devices=2,
                               checkpoint_every=3, keep_checkpoints=2)
    full = subprocess.run(_train_cmd(config, tmp_path / "full"), capture_output=True, text=True,
                          cwd=ROOT, env=_env(2), timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    work = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(config, work), cwd=ROOT, env=_env(2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    ckpts = work / "checkpoints"
    while time.time() < deadline:
        if (ckpts / "6").is_dir() or proc.poll() is not None:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "export").exists()
    resumed = subprocess.run(_train_cmd(config, work), capture_output=True, text=True, cwd=ROOT,
                             env=_env(2), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    a = load_file(tmp_path / "full" / "export" / "latest" / "model.safetensors")
    b = load_file(work / "export" / "latest" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 11


def test_first_step_loss_equals_sentence_transformers_mnrl(tmp_path, shared_data):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from reasonembed_jax.tiny_model import write_tiny_model

    model_dir = tmp_path / "tiny"
    write_tiny_model(str(shared_data / "hf_configs" / "Qwen3-0.6B"), str(model_dir),
                     tokenizer_dir=str(shared_data / "qwen3_tokenizer"), append_eos=True, seed=3)
    with gzip.open(shared_data / "bright" / "examples" / "biology.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f][:16]
    prompt = "Given a Biology post, retrieve relevant passages that help answer the post."
    records = []
    for i in range(4):
        negs = [rows[4 + 3 * i + k]["gold_answer"][:300] for k in range(3)]
        records.append({"prompt": prompt, "query": rows[i]["query"][:300],
                        "pos": [rows[i]["gold_answer"][:300]], "neg": negs})
    data = tmp_path / "bio.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    c = tiny_train_config(steps=1, devices=1)
    c.model.init, c.model.hf_dir, c.model.shrink = "hf", str(model_dir), {}
    c.loss.kind = "infonce"
    c.data.sources = (str(data),)
    c.data.use_reasoning_query = False
    c.data.batch_size, c.data.group_size = 4, 4
    c.data.pad_to_max_length = False
    c.data.query_max_length = c.data.passage_max_length = 512
    c.mesh.data = 1
    # The evaluation hook runs on the same path as the evaluate CLI and logs its metrics.
    c.eval.every = 1
    c.eval.data = f"bright:{ROOT / 'tests' / 'data' / 'eval_bright_mini'}:biology"
    c.eval.max_length, c.eval.top_k = 64, 10
    ours = Trainer(c, str(tmp_path / "run")).run()["history"][0]["loss"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(0.0 <= row.get("eval/average/ndcg@10", -1) <= 1.0 for row in logged)

    st = SentenceTransformer(str(model_dir), device="cpu")
    loss_fn = MultipleNegativesRankingLoss(st, scale=1 / 0.02)
    columns = [[format_query(r["query"], prompt) for r in records], [r["pos"][0] for r in records]]
    columns += [[r["neg"][k] for r in records] for k in range(3)]
    features = [st.tokenize(col) for col in columns]
    with torch.no_grad():
        theirs = float(loss_fn(features, labels=None))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
