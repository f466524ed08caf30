"""The package's run-time defaults (``reasonembed_jax/__init__.py``): XLA:CPU without YNNPACK
fusions and JAX's persistent compilation cache, each checked in fresh processes against the
process without them (and the numbers against a float64 numpy formula)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import json, sys
import reasonembed_jax  # first: its defaults must reach JAX before JAX starts
import jax, jax.numpy as jnp, numpy as np
from jax._src import monitoring

events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))

def attend(q, k, v, w):
    s = jax.nn.softmax(q @ k.T / 8.0, axis=-1)
    return jnp.tanh((s @ v) @ w)

rng = np.random.default_rng(0)
args = [rng.standard_normal(s).astype(np.float32) for s in ((96, 64), (96, 64), (96, 64), (64, 64))]
compiled = jax.jit(attend).lower(*args).compile()
out = np.asarray(compiled(*args))
print(json.dumps({"ynn": "__ynn_fusion" in compiled.as_text(), "out": out.tolist(),
                  "cache": sorted({e.rsplit("/", 1)[-1] for e in events if "cache_" in e}),
                  "cache_dir": jax.config.jax_compilation_cache_dir}))
"""


def run(tmp_path, **env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "REASONEMBED_RUNTIME_DEFAULTS",
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"), **env_overrides)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reference() -> np.ndarray:
    rng = np.random.default_rng(0)
    q, k, v, w = (rng.standard_normal(s).astype(np.float32).astype(np.float64)
                  for s in ((96, 64), (96, 64), (96, 64), (64, 64)))
    s = q @ k.T / 8.0
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.tanh((p / p.sum(-1, keepdims=True)) @ v @ w)


def test_ynn_fusions_off_by_default_and_on_when_opted_out(tmp_path):
    ours = run(tmp_path)
    xla_default = run(tmp_path, REASONEMBED_RUNTIME_DEFAULTS="0")
    assert not ours["ynn"]
    assert xla_default["ynn"], "XLA:CPU no longer makes YNNPACK fusions: the default is moot"
    # A user's own setting wins over ours.
    kept = run(tmp_path, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert kept["ynn"]
    expected = reference()
    for result in (ours, xla_default, kept):
        np.testing.assert_allclose(np.asarray(result["out"]), expected, atol=2e-5)


def test_persistent_compilation_cache_second_process_loads_instead_of_compiling(tmp_path):
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = run(tmp_path, **env)
    second = run(tmp_path, **env)
    assert first["cache_dir"] == str(tmp_path / "xdg" / "reasonembed_jax" / "xla")
    assert "cache_misses" in first["cache"] and "cache_hits" not in first["cache"]
    assert "cache_hits" in second["cache"] and "cache_misses" not in second["cache"]
    assert os.listdir(first["cache_dir"])
    assert second["out"] == first["out"]  # bit-identical from the loaded executable
    opted_out = run(tmp_path, REASONEMBED_RUNTIME_DEFAULTS="0", **env)
    assert opted_out["cache_dir"] is None and not opted_out["cache"]
