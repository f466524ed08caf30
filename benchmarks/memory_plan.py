"""Recipe memory plans from the trainer's ``--dry_run`` (compile only: no weights, no data).

For each recipe (Qwen3-8B, Qwen3-4B, Llama-3.1-8B), LoRA and full fine-tuning, with and without
GradCache, it compiles the ReasonEmbed step at 1,024 passages x 512 tokens per global batch on
an N-device mesh (N fake CPU devices, parameters and optimizer state sharded over all of them on
the ``fsdp`` axis) for the largest domain shape (leetcode: G=2, 512 queries per global batch),
and reports the per-device peak. N doubles from 8 until the plan fits ``--budget-gib``.

    python benchmarks/memory_plan.py [--budget-gib 80] [--max-devices 64] [--models qwen3_8b,...]
                                     [--rows lora,lora+gradcache,full,full+gradcache]
    python benchmarks/memory_plan.py --one-device   # the GPU suite's part 3 on one device

``--one-device`` plans ``benchmarks/gpu_suite.py`` part 3 instead: Qwen3-8B, LoRA r=32,
GradCache (8-row chunks), 64 queries + 64 reasoning queries + 1,024 passages x 512 tokens, on
one device (``--chunk`` changes the chunk).

Caveat: the numbers are XLA's CPU buffer assignment; GPU and TPU compilers schedule and fuse
differently, so treat them as a plan to check, not a guarantee. XLA:CPU computes bf16 in float32
and hoists float32 copies of the frozen bf16 weights out of the layer loops; the trainer finds
them in the compiled HLO (``memory_plan.widened_parameter_bytes``) and the table reports them apart
("CPU-only copies"), with the peak without them.
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
COMMON = ROOT / "configs" / "common.py"  # the recipe
CONFIG = """
from reasonembed_jax.training.config import load_module

common = load_module({common!r})

def get_config(arg=None):
    c = common.reasonembed_config({folder!r}, {variants!r})
    devices = {devices}
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, devices, 1
    g, b = common.RECIPE_DOMAIN_SHAPES["leetcode"]  # the largest step (512 queries, 1,024 passages)
    c.data.domains = {{"leetcode": {{"group_size": g, "batch_size": b * 8 // devices}}}}
    c.train.grad_cache_chunk = 8
    return c
"""
ONE_DEVICE = """
from reasonembed_jax.training.config import load_module

common = load_module({common!r})

def get_config(arg=None):
    c = common.reasonembed_config("Qwen3-8B", "gradcache")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.data.num_devices = 1
    c.data.domains = {{"gpu_suite_part3": {{"group_size": 16, "batch_size": 64}}}}
    c.train.grad_cache_chunk = {chunk}
    return c
"""
MODELS = {"qwen3_8b": "Qwen3-8B", "qwen3_4b": "Qwen3-4B", "llama31_8b": "Llama-3.1-8B"}


PLAN_LINE = re.compile(r"peak\s+([\d.]+) GiB/device \(args ([\d.]+), temp ([\d.]+)"
                       r"(?:; CPU-only float32 copies of 16-bit weights ([\d.]+), peak without "
                       r"them ([\d.]+))?\)")


def plan(folder: str, variants: str, devices: int, config_text: str | None = None
         ) -> tuple[float, float, float, float, float]:
    """(peak, args, temp, CPU-only float32 weight copies, peak without them) in GiB/device."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pathlib.Path(tmp) / "plan_config.py"
        cfg.write_text(config_text or CONFIG.format(common=str(COMMON), folder=folder,
                                                    variants=variants, devices=devices))
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = subprocess.run([sys.executable, "-m", "reasonembed_jax.train", f"--config={cfg}",
                               "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True)
    match = PLAN_LINE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"dry run failed for {folder} {variants} on {devices}:\n"
                           f"{proc.stderr[-2000:]}")
    peak, arg_gib, temp = (float(match.group(i)) for i in (1, 2, 3))
    widened = float(match.group(4) or 0.0)
    return peak, arg_gib, temp, widened, float(match.group(5) or peak)


def one_device(chunk: int, budget: float) -> None:
    start = time.perf_counter()
    peak, arg_gib, temp, widened, less = plan("Qwen3-8B", "gradcache", 1,
                                              ONE_DEVICE.format(common=str(COMMON), chunk=chunk))
    print(f"gpu_suite part 3 on 1 device (Qwen3-8B, LoRA r=32, GradCache chunk {chunk}, 64 q + "
          f"64 reasoning + 1,024 passages x 512): peak {peak:.2f} GiB (args {arg_gib:.2f} + temp "
          f"{temp:.2f}), of which CPU-only float32 weight copies {widened:.2f}; without them "
          f"{less:.2f} GiB: {'under' if less <= budget else 'over'} {budget:.0f} GiB "
          f"({time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=80.0, help="per-device memory")
    parser.add_argument("--max-devices", type=int, default=64)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", default="lora,lora+gradcache,full,full+gradcache",
                        help="which tunings to plan per model")
    parser.add_argument("--one-device", action="store_true",
                        help="plan the GPU suite's part 3 on one device instead of the table")
    parser.add_argument("--chunk", type=int, default=8, help="GradCache rows per chunk "
                        "(--one-device)")
    args = parser.parse_args()
    if args.one_device:
        one_device(args.chunk, args.budget_gib)
        return
    rows = []
    print("| model | tuning | GradCache | peak GiB/device on 8 (args + temp) | of which CPU-only "
          "f32 weight copies | peak on 8 without them | smallest mesh under "
          f"{args.budget_gib:.0f} GiB (peak; without the copies) |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for key in args.models.split(","):
        folder = MODELS[key]
        for tuning in ("lora", "full"):
            for grad_cache in (False, True):
                if tuning + ("+gradcache" if grad_cache else "") not in args.rows.split(","):
                    continue
                variants = ",".join(v for v in ("full" if tuning == "full" else "",
                                                "gradcache" if grad_cache else "") if v)
                start = time.perf_counter()
                devices, first, fits = 8, None, None
                while devices <= args.max_devices:
                    peak, arg_gib, temp, widened, less = plan(folder, variants, devices)
                    if first is None:
                        first = (peak, arg_gib, temp, widened, less)
                    if peak <= args.budget_gib:  # the measured CPU peak decides (conservative)
                        fits = (devices, peak, less)
                        break
                    devices *= 2
                smallest = (f"{fits[0]} ({fits[1]:.1f}; {fits[2]:.1f})" if fits
                            else f"> {args.max_devices}")
                row = (f"| {folder} | {tuning} | {'yes' if grad_cache else 'no'} | "
                       f"{first[0]:.1f} ({first[1]:.1f} + {first[2]:.1f}) | {first[3]:.1f} | "
                       f"{first[4]:.1f} | {smallest} |")
                rows.append(row)
                print(row + f"  <!-- {time.perf_counter() - start:.0f}s, load "
                      f"{os.getloadavg()[0]:.1f} -->", flush=True)


if __name__ == "__main__":
    main()
