"""Nothing silently wrong (issue 15): bad settings, non-finite updates, degenerate RI batches,
stale embedding caches, truncated inputs, damaged checkpoints, half-written exports, full
disks, preemption and CLI user errors. Each test failed on the code before its fix."""

import json
import pathlib
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_parallel import _tiny_model_config

from reasonembed_jax.model import init_params
from reasonembed_jax.records import RecordError
from reasonembed_jax.training.step import StepConfig, make_optimizer, make_train_step
from reasonembed_jax.training.trainer import Trainer, TrainingError
from train_configs import random_batch, tiny_train_config

# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("group,key,value", [
    ("optim", "learning_rate", float("nan")),
    ("optim", "learning_rate", -1e-4),
    ("optim", "b2", 1.0),
    ("loss", "temperature", 0.0),
    ("loss", "kappa", float("inf")),
    ("train", "num_steps", 0),
    ("train", "checkpoint_every", 0),
    ("data", "batch_size", 0),
    ("data", "batch_size", -2),
    ("data", "num_epochs", float("nan")),
    ("eval", "max_length", 0),
    ("optim", "reference_world_size", 0),
])
def test_bad_setting_is_refused_naming_the_key(group, key, value, tmp_path):
    c = tiny_train_config(steps=2, devices=8)
    c[group][key] = value
    with pytest.raises(TrainingError, match=rf"config\.{group}\.{key} must be"):
        Trainer(c, str(tmp_path))


def test_unset_is_none_not_zero(tmp_path):
    c = tiny_train_config(steps=2, devices=8)
    c.train.num_steps = None  # unset: the data decides
    c.optim.clip_norm = None  # unset: no clipping
    Trainer(c, str(tmp_path))


def test_non_finite_update_is_never_applied():
    """A NaN learning rate with a finite loss and gradient: the update is skipped."""
    cfg = _tiny_model_config()
    params = init_params(cfg, 0)
    optimizer = make_optimizer(lambda s: jnp.nan)
    state = {"step": jnp.asarray(0), "params": params, "opt_state": optimizer.init(params),
             "rng": jax.random.key_data(jax.random.key(0))}
    step_fn = jax.jit(make_train_step(StepConfig(model=cfg, loss="infonce"), optimizer,
                                      lambda s: jnp.nan))
    new, metrics = step_fn(state, {}, random_batch(4, 2, 8, 3))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for leaf in jax.tree.leaves(new["opt_state"]):
        assert np.all(np.isfinite(np.asarray(leaf)))


# -- embedding cache identity -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, shared_data):
    from reasonembed_jax.tiny_model import write_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    write_tiny_model(str(shared_data / "hf_configs" / "Qwen3-0.6B"), str(out),
                     tokenizer_dir=str(shared_data / "qwen3_tokenizer"), append_eos=True, seed=0)
    return out


def test_cache_key_sees_every_weight_byte(tiny_model_dir, tmp_path):
    """Two models of the same shapes that differ in a few bytes of one tensor (where a sampled
    fingerprint does not look) must not share cached corpus embeddings."""
    import os
    import shutil
    import struct

    from reasonembed_jax import hf_io
    from reasonembed_jax.encode import TextEncoder

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)  # copy2: times kept, so the recorded hashes apply
    weights = other / "model.safetensors"
    size = weights.stat().st_size
    step = size // 64
    assert step > 2 * 65536, "the test needs a weight file larger than the sampled blocks"
    offset = (32 * step + 65536 + 4096) // 8 * 8  # between two sampled 64 KiB blocks
    (header_len,) = struct.unpack("<Q", weights.read_bytes()[:8])
    assert offset > 8 + header_len
    with open(weights, "r+b") as f:
        f.seek(offset)
        old = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0x01 for b in old))  # flip the lowest mantissa bits
    assert weights.stat().st_size == size

    a = TextEncoder.from_pretrained(tiny_model_dir, max_length=16)
    b = TextEncoder.from_pretrained(other, max_length=16)
    assert a.cache_key != b.cache_key
    # The digest recorded by the export is the digest of the files (re-hashed without it).
    recorded = hf_io.content_hash(tiny_model_dir)
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    os.remove(plain / hf_io.CONTENT_HASH_FILE)
    assert hf_io.content_hash(plain) == recorded
    assert hf_io.content_hash(other) != recorded


# -- RI-InfoNCE on a solved batch ---------------------------------------------------------------


def _np_ri_weights(losses, reasoning_losses, kappa, eps=1e-6):
    w = np.clip(np.asarray(losses, np.float64) / (np.asarray(reasoning_losses, np.float64) + eps),
                0.0, kappa)
    return w / w.sum() if w.sum() > 0 else np.full(w.shape, 1.0 / w.shape[0])


@pytest.mark.parametrize("solved", ["all", "half"])
def test_ri_infonce_solved_batch_has_uniform_weights_not_nan(solved):
    from reasonembed_jax import losses

    b, g, d = 4, 2, 8
    rng = np.random.default_rng(0)
    p = np.zeros((b * g, d), np.float32)
    p[np.arange(b * g), np.arange(b * g)] = 1.0  # orthonormal passages
    q = p[::g].copy()  # every query equals its positive: loss exactly 0 at tau 0.02 in float32
    if solved == "half":
        q[: b // 2] = rng.normal(size=(b // 2, d)).astype(np.float32)
    rq = rng.normal(size=(b, d)).astype(np.float32)
    loss, aux = losses.ri_infonce_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(rq),
                                       group_size=g, temperature=0.02, kappa=5.0)
    if solved == "all":
        assert np.all(np.asarray(aux["per_query_loss"]) == 0.0)
    expected = _np_ri_weights(aux["per_query_loss"], aux["reasoning_loss"], 5.0)
    np.testing.assert_allclose(np.asarray(aux["weights"]), expected, rtol=1e-5)
    assert np.isfinite(float(loss))
    assert float(aux["ri_uniform"]) == (1.0 if solved == "all" else 0.0)
    # Before the RI warm-up ends the weights are uniform anyway and nothing is counted.
    _, warm = losses.ri_infonce_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(rq),
                                     group_size=g, use_weights=False)
    assert float(warm["ri_uniform"]) == 0.0


# -- 0 is not "unset" ---------------------------------------------------------------------------


def test_zero_max_length_is_an_error_not_the_default(tiny_model_dir, tmp_path, capsys):
    from reasonembed_jax import encode

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "moths"}\n')
    with pytest.raises(SystemExit) as exit_info:
        encode.main(["--model", str(tiny_model_dir), "--input", str(docs), "--out",
                     str(tmp_path / "e.npy"), "--max-length", "0", "--no-progress"])
    assert exit_info.value.code == 2 and "--max-length" in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        encode.TextEncoder.from_pretrained(tiny_model_dir, max_length=0)


# -- truncated .jsonl.gz ------------------------------------------------------------------------


@pytest.fixture
def truncated_gz(tmp_path):
    from reasonembed_jax.data.pipeline import DEMO_DATA_DIR

    data = (pathlib.Path(DEMO_DATA_DIR) / "biology.jsonl.gz").read_bytes()
    path = tmp_path / "biology.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy
    # The reference: the complete lines a streaming decompressor recovers (zlib, not gzip).
    text = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[: len(data) // 2])
    complete = [line for line in text.split(b"\n")[:-1] if line.strip()]
    return path, complete


def test_truncated_gzip_is_counted_with_its_name_and_the_run_goes_on(truncated_gz, tmp_path):
    from reasonembed_jax.data.index import index_records
    from reasonembed_jax.data.sources import open_source

    path, complete = truncated_gz
    source = open_source(str(path))
    index = index_records([source], [None])
    assert 0 < len(complete) == index.stats.num_valid == len(source)
    assert [source[i] for i in range(len(source))] == complete
    assert index.stats.bad_counts == {"truncated_file": 1}
    assert str(path) in index.stats.summary()
    assert index.stats.as_metrics()["data/records_skipped/truncated_file"] == 1.0
    with pytest.raises(RecordError, match=rf"{re.escape(str(path))}:\d+: compressed data ends"):
        index_records([open_source(str(path))], [None], strict=True)


def test_convert_reads_a_truncated_gzip_or_stops_clearly_when_strict(truncated_gz, tmp_path,
                                                                      capsys):
    from reasonembed_jax.data import convert
    from reasonembed_jax.data.sources import open_source

    path, complete = truncated_gz
    assert convert.main([str(path), "--out-dir", str(tmp_path / "out")]) == 0
    out = open_source(str(tmp_path / "out" / "biology.array_record"))
    assert [out[i] for i in range(len(out))] == complete
    err = capsys.readouterr().err
    assert f"{path}" in err and "truncated_file=1" in err
    assert convert.main([str(path), "--out-dir", str(tmp_path / "strict"), "--strict"]) == 2
    assert "compressed data ends early" in capsys.readouterr().err


# -- damaged checkpoints ------------------------------------------------------------------------


def _damage(step_dir):
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")


def test_damaged_checkpoint_is_quarantined_and_saved_again(tmp_path):
    """Falling back past a damaged step moves it aside; resuming from the previous step and
    training up to it again saves it again, and the saved run equals an uninterrupted one."""
    from reasonembed_jax.training.checkpoint import Checkpointer, abstract_like

    c = tiny_train_config(steps=4, devices=1)
    c.mesh.data = 1
    c.train.checkpoint_every = 2
    c.train.async_checkpoints = False
    full = Trainer(c, str(tmp_path / "run")).run()
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4]
    _damage(ckpts / "4")
    resumed = Trainer(c, str(tmp_path / "run")).run()
    assert resumed["history"][0]["step"] == 2  # fell back to step 2
    for a, b in zip(jax.tree.leaves(resumed["state"]["params"]),
                    jax.tree.leaves(full["state"]["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Step 4 was saved again: the next start resumes there, with the same parameters.
    step, state, _ = Checkpointer(str(ckpts), every=2, keep=3).restore_latest(
        abstract_like(full["state"]))
    assert step == 4
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(full["state"]["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "run" / "checkpoints.damaged" / "4-0").is_dir()


# -- exports appear whole or not at all ---------------------------------------------------------


def test_export_interrupted_leaves_no_half_folder(tmp_path, monkeypatch, qwen3_tokenizer_dir):
    """A failure (or a kill) part-way through an export: ``out`` never holds a partial folder,
    and an earlier export there stays whole."""
    import errno

    from reasonembed_jax import hf_io

    cfg = _tiny_model_config()
    params = init_params(cfg, 0)
    out = tmp_path / "export" / "step_3"
    seen = {}
    real = hf_io._write_sentence_transformers_files

    def interrupted(out_dir, *args):
        real(out_dir, *args)
        seen["out_exists_mid_export"] = out.exists()  # what a kill here would leave
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))

    monkeypatch.setattr(hf_io, "_write_sentence_transformers_files", interrupted)
    with pytest.raises(OSError, match="No space left"):
        hf_io.export_hf(params, cfg, out, tokenizer_dir=qwen3_tokenizer_dir, dtype="float32")
    assert seen == {"out_exists_mid_export": False}
    assert not out.exists() and list(out.parent.iterdir()) == []

    monkeypatch.setattr(hf_io, "_write_sentence_transformers_files", real)
    hf_io.export_hf(params, cfg, out, tokenizer_dir=qwen3_tokenizer_dir, dtype="float32")
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(hf_io, "_write_sentence_transformers_files", interrupted)
    with pytest.raises(OSError):
        hf_io.export_hf(params, cfg, out, tokenizer_dir=qwen3_tokenizer_dir, dtype="float32")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["step_3"]
    hf_io.load_encoder(out)  # still loads


# -- full disk ----------------------------------------------------------------------------------

# What Orbax raises when the disk fills (measured on a 600 KiB tmpfs, Orbax 0.12.8).
_ORBAX_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file '
                 '"{d}/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": '
                 'Failed to write 3160422 bytes to file 4: No space left on device '
                 "[os_error_code='28']")


def test_full_disk_is_one_line_with_the_path_and_keeps_the_previous_checkpoint(tmp_path,
                                                                               monkeypatch):
    import errno

    from reasonembed_jax.cli import user_error_message
    from reasonembed_jax.training.checkpoint import Checkpointer, abstract_like

    directory = tmp_path / "ck"
    ckpt = Checkpointer(str(directory), every=1, keep=3, async_save=False)
    state = {"w": jnp.arange(6.0)}
    ckpt.save(1, state, {"grain": {"n": 1}})
    (directory / "2.orbax-checkpoint-tmp").mkdir()  # what the failed write left

    def disk_full(step, **kwargs):
        raise ValueError(_ORBAX_ENOSPC.format(d=directory))

    monkeypatch.setattr(ckpt.manager, "save", disk_full)
    with pytest.raises(OSError) as info:
        ckpt.save(2, {"w": state["w"] * 2}, {"grain": {"n": 2}})
    err = info.value
    assert err.errno == errno.ENOSPC and err.filename == str(directory)
    line = user_error_message(err)
    assert "\n" not in line and str(directory) in line and "No space left on device" in line
    assert "step 1" in line and "intact" in line
    assert not (directory / "2.orbax-checkpoint-tmp").exists()  # its space is freed
    ckpt.close()  # already reported: no second error
    step, got, data = Checkpointer(str(directory), every=1, keep=3).restore_latest(
        abstract_like(state))
    assert step == 1 and data == {"grain": {"n": 1}}
    np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(6.0))


# -- preemption and CLI errors ------------------------------------------------------------------


def test_sigterm_saves_and_exits_with_the_requeue_code(tmp_path):
    import signal
    import subprocess
    import time

    from test_train_cli import _env, _train_cmd

    from reasonembed_jax.cli import EXIT_PREEMPTED
    from train_configs import ROOT, write_config_file

    config = write_config_file(tmp_path / "c.py", steps=90, devices=1, domains=("biology",),
                               log_every=1, checkpoint_every=1000)
    work = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(config, work), cwd=ROOT, env=_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    metrics = work / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be preempted"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_PREEMPTED == 75, err[-3000:]
    assert "preempted: stopped at step" in err and "Traceback" not in err
    stopped = json.loads(out)["stopped_at"]
    assert 1 <= stopped < 90
    assert (work / "checkpoints" / str(stopped)).is_dir()
    assert not (work / "export").exists()


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, harmless
@pytest.mark.parametrize("module,argv", [
    ("encode", ["--model", "{missing}", "--input", "{missing}/docs.jsonl", "--out", "{tmp}/e.npy"]),
    ("encode", ["--model", "{tmp}", "--input", "{bad_jsonl}", "--out", "{tmp}/e.npy"]),
    ("evaluate", ["--model", "bm25", "--data", "beir:{missing}", "--out", "{tmp}/r.json"]),
    ("tiny_model", ["--config", "{missing}", "--out", "{tmp}/tiny"]),
    ("data.build_records", ["bright", "--bright-dir", "{missing}", "--out-dir", "{tmp}/o"]),
    ("data.convert", ["{missing}/a.jsonl.gz", "--out-dir", "{tmp}/o"]),
    ("data.tfds_builder", ["{missing}/a.jsonl.gz", "--data-dir", "{tmp}/o"]),
])
def test_cli_user_error_is_one_line_and_exit_code_2(module, argv, tmp_path, capsys, monkeypatch):
    import runpy
    import sys

    missing = tmp_path / "no_such_folder"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    argv = [a.format(missing=missing, tmp=tmp_path, bad_jsonl=bad) for a in argv]
    if module == "data.tfds_builder":
        # TFDS registers the builder class by name once per process; another test may already
        # have built it here, so this CLI runs in a process of its own, as a user runs it.
        import subprocess

        from test_train_cli import _env

        from train_configs import ROOT

        proc = subprocess.run([sys.executable, "-m", f"reasonembed_jax.{module}", *argv],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env(1))
        code, err = proc.returncode, proc.stderr
    else:
        monkeypatch.setattr(sys, "argv", [f"reasonembed_jax.{module}", *argv])
        with pytest.raises(SystemExit) as info:
            runpy.run_module(f"reasonembed_jax.{module}", run_name="__main__", alter_sys=True)
        code, err = info.value.code, capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert str(missing) in lines[0] or str(bad) in lines[0]


def test_train_cli_bad_setting_is_one_line_and_exit_code_2(tmp_path):
    import subprocess

    from test_train_cli import _env, _train_cmd

    from train_configs import ROOT

    proc = subprocess.run(_train_cmd("configs/demo.py", tmp_path, "--config.optim.learning_rate=nan"),
                          capture_output=True, text=True, cwd=ROOT, env=_env(1), timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: config.optim.learning_rate must be finite, got nan" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- suspicious but valid input -----------------------------------------------------------------


def test_empty_texts_are_warned_and_counted(tiny_model_dir, caplog):
    from reasonembed_jax.encode import TextEncoder

    encoder = TextEncoder.from_pretrained(tiny_model_dir, max_length=16)
    with caplog.at_level("WARNING"):
        emb = encoder.encode(["moths", "", "  \n"], progress=False)
    assert emb.shape[0] == 3 and encoder.num_empty_texts == 2
    assert "2 of 3 texts are empty or blank (first at index 1, 2)" in caplog.text
    caplog.clear()
    encoder.encode(["moths"], progress=False)
    assert encoder.num_empty_texts == 0 and "empty" not in caplog.text


def test_duplicate_ids_and_identical_records_are_warned_and_counted(tmp_path, caplog):
    from reasonembed_jax.data.index import index_records
    from reasonembed_jax.data.sources import open_source

    def rec(rid, query, source=None):
        out = {"id": rid, "prompt": "p", "query": query, "pos": ["a"], "neg": ["b", "c"]}
        return out if source is None else {**out, "source_id": source}

    # line 3 differs from line 1 only in id and provenance (source_id): the same training content
    rows = [rec("r1", "q1"), rec("r1", "q2"), rec("r3", "q1", "d9"), rec("r4", "q4"),
            rec("r4", "q4")]
    path = tmp_path / "dom.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        index = index_records([open_source(str(path))], [None])
    stats = index.stats
    assert stats.num_valid == 5  # kept: counted and reported, not dropped
    # ids: line 2 repeats r1, line 5 repeats r4; content: line 3 = line 1, line 5 = line 4
    assert (stats.duplicate_ids, stats.identical_records) == (2, 2)
    assert stats.as_metrics()["data/duplicate_ids"] == 2.0
    assert f"{path}:2: id 'r1' also at {path}:1" in caplog.text
    assert f"{path}:3: same record as {path}:1" in caplog.text


def test_checkpoint_with_non_finite_weights_is_not_resumed(tmp_path):
    from reasonembed_jax.training.checkpoint import Checkpointer, abstract_like
    from reasonembed_jax.training.trainer import finite_state

    state = {"params": {"w": jnp.arange(4.0)}, "opt_state": (jnp.zeros(4),)}
    ckpt = Checkpointer(str(tmp_path / "ck"), every=1, keep=3, async_save=False)
    ckpt.save(1, state, {"grain": 1})
    ckpt.save(2, {**state, "params": {"w": jnp.full(4, jnp.nan)}}, {"grain": 2})
    step, got, data = Checkpointer(str(tmp_path / "ck"), every=1, keep=3).restore_latest(
        abstract_like(state), accept=finite_state)
    assert step == 1 and data == {"grain": 1}
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.arange(4.0))
