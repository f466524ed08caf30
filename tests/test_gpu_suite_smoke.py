"""``benchmarks/gpu_suite.py --smoke``: every part of the accelerator suite runs its code path,
tiny, on CPU, and none reports an error (so a lent GPU session finds a working script)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs_every_part(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT), XLA_FLAGS="")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    errors = [r for r in rows if r["measurement"] == "ERROR" or "ERROR" in str(r["value"])]
    assert not errors, errors
    got = {(r["part"], r["measurement"]): r["value"] for r in rows}
    assert got[("1 parity", "min cosine ours fp32 vs HF fp32")] > 0.9999
    assert got[("1 parity", "min cosine ours bf16 vs HF bf16")] > 0.99
    assert got[("3 recipe 8B", "projected hours, one epoch of 81,659 queries")] > 0
    assert got[("4 encode", "sentence-transformers tokens/s (same ids)")] > 0
