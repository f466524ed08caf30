"""Recipe memory plans from the trainer's ``--dry_run`` (compile only: no weights, no data).

For each recipe (Qwen3-8B, Qwen3-4B, Llama-3.1-8B), LoRA and full fine-tuning, with and without
GradCache, it compiles the ReasonEmbed step at 1,024 passages x 512 tokens per global batch on
an N-device mesh (N fake CPU devices, parameters and optimizer state sharded over all of them on
the ``fsdp`` axis) for the largest domain shape (leetcode: G=2, 512 queries per global batch),
and reports the per-device peak. N doubles from 8 until the plan fits ``--budget-gib``.

    python benchmarks/memory_plan.py [--budget-gib 80] [--max-devices 64] [--models qwen3_8b,...]

Caveat: the numbers are XLA's CPU buffer assignment; GPU and TPU compilers schedule and fuse
differently, so treat them as a plan to check, not a guarantee.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = """
from reasonembed_jax.training.recipes import reasonembed_config

def get_config(arg=None):
    c = reasonembed_config({folder!r}, {variants!r})
    devices = {devices}
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, devices, 1
    g, b = 2, 64  # leetcode, the largest step of the recipe (512 queries, 1,024 passages)
    c.data.domains = {{"leetcode": {{"group_size": g, "batch_size": b * 8 // devices}}}}
    c.train.grad_cache_chunk = 8
    return c
"""
MODELS = {"qwen3_8b": "Qwen3-8B", "qwen3_4b": "Qwen3-4B", "llama31_8b": "Llama-3.1-8B"}


def plan(folder: str, variants: str, devices: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pathlib.Path(tmp) / "plan_config.py"
        cfg.write_text(CONFIG.format(folder=folder, variants=variants, devices=devices))
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = subprocess.run([sys.executable, "-m", "reasonembed_jax.train", f"--config={cfg}",
                               "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True)
    match = re.search(r"peak\s+([\d.]+) GiB/device \(args ([\d.]+), temp ([\d.]+)\)", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"dry run failed for {folder} {variants} on {devices}:\n"
                           f"{proc.stderr[-2000:]}")
    return float(match.group(1)), float(match.group(2)), float(match.group(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=80.0, help="per-device memory")
    parser.add_argument("--max-devices", type=int, default=64)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    rows = []
    print("| model | tuning | GradCache | peak GiB/device on 8 (args + temp) | smallest mesh "
          f"under {args.budget_gib:.0f} GiB (peak) |", flush=True)
    print("|---|---|---|---|---|", flush=True)
    for key in args.models.split(","):
        folder = MODELS[key]
        for tuning in ("lora", "full"):
            for grad_cache in (False, True):
                variants = ",".join(v for v in ("full" if tuning == "full" else "",
                                                "gradcache" if grad_cache else "") if v)
                start = time.perf_counter()
                devices, first, fits = 8, None, None
                while devices <= args.max_devices:
                    peak, arg_gib, temp = plan(folder, variants, devices)
                    if first is None:
                        first = (peak, arg_gib, temp)
                    if peak <= args.budget_gib:
                        fits = (devices, peak)
                        break
                    devices *= 2
                smallest = f"{fits[0]} ({fits[1]:.1f})" if fits else f"> {args.max_devices}"
                row = (f"| {folder} | {tuning} | {'yes' if grad_cache else 'no'} | "
                       f"{first[0]:.1f} ({first[1]:.1f} + {first[2]:.1f}) | {smallest} |")
                rows.append(row)
                print(row + f"  <!-- {time.perf_counter() - start:.0f}s -->", flush=True)


if __name__ == "__main__":
    main()
