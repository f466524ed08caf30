"""Accuracy and speed of XLA:CPU's float32 matmul, with and without its YNNPACK dot fusion.

jax 0.10's XLA:CPU sends float32 dots to YNNPACK (``__ynn_fusion`` in the compiled HLO). On real
decoder activations that kernel is about twice as far from float64 as PyTorch's fp32 matmul, and
it is what makes our fp32 decoder noisier than HF's (README, real-model parity). This script
shows it on plain random matrices: each setting runs in its own process (XLA reads ``XLA_FLAGS``
once, when the backend starts) and prints, against the same product in numpy float64, the
per-row max abs error divided by the row's max |exact| in units of float32 epsilon (mean and max
over rows), the kernel XLA chose and the time per call; PyTorch fp32 and numpy fp32 are the
reference rows.

    python benchmarks/cpu_dot_accuracy.py [--m 256 --k 576 --n 1536 --repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

# Turns YNNPACK dots off (XLA then emits its own dot); an experimental flag of jax 0.10's XLA.
NO_YNN_DOTS = ("--xla_cpu_experimental_ynn_fusion_type="
               "-LIBRARY_FUSION_TYPE_DOT,-LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")


def _operands(m: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return a, b, a.astype(np.float64) @ b.astype(np.float64)


def _error(y: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    e = np.abs(np.asarray(y, np.float64) - exact).max(-1) / np.abs(exact).max(-1)
    e /= np.finfo(np.float32).eps
    return float(e.mean()), float(e.max())


def _child(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    a, b, exact = _operands(args.m, args.k, args.n)
    f = jax.jit(jnp.dot)
    kernel = "YNNPACK" if "__ynn_fusion" in f.lower(a, b).compile().as_text() else "XLA"
    f(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(args.repeats):
        y = f(a, b).block_until_ready()
    ms = (time.perf_counter() - start) / args.repeats * 1e3
    print(json.dumps({"kernel": kernel, "error": _error(y, exact), "ms": ms}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    print(f"[{args.m}, {args.k}] x [{args.k}, {args.n}] float32; error vs numpy float64 in fp32 "
          f"eps (per-row max / row max |exact|): mean, max; load {os.getloadavg()[0]:.1f}")
    base = [a for a in os.environ.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in a]
    for name, extra in (("XLA:CPU default", []), ("XLA:CPU, YNNPACK dots off", [NO_YNN_DOTS])):
        env = dict(os.environ, XLA_FLAGS=" ".join(base + extra))
        out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env,
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"  {name:40s} [{r['kernel']:7s}] {r['error'][0]:5.2f} {r['error'][1]:6.2f}"
              f"  {r['ms']:.2f} ms")
    a, b, exact = _operands(args.m, args.k, args.n)
    import torch

    torch.set_num_threads(1)
    t_err = _error((torch.from_numpy(a) @ torch.from_numpy(b)).numpy(), exact)
    print(f"  {'PyTorch fp32 (1 thread)':40s} [torch  ] {t_err[0]:5.2f} {t_err[1]:6.2f}")
    n_err = _error(a @ b, exact)
    print(f"  {'numpy fp32':40s} [BLAS   ] {n_err[0]:5.2f} {n_err[1]:6.2f}")


if __name__ == "__main__":
    main()
