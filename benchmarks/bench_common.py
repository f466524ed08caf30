"""What every speed benchmark here shares, so none of them can mislead in its own way:

- ``import reasonembed_jax`` before anything imports JAX, so the package's run-time defaults
  (XLA:CPU flags, compilation cache) apply to the benchmarked process as they do to users';
- ``machine_line`` (load average, cores, XLA_FLAGS) printed beside every table, and
  ``warn_if_busy`` before the work starts: figures taken at load ~5 once overstated our speed
  1.5-2.8x against torch;
- ``interleave``: the implementations timed A B A B ..., so background load hits all alike;
- ``median_range``: the median with its min-max, never a best-of.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import reasonembed_jax  # noqa: F401  (its run-time defaults must precede JAX's start)


def machine_line() -> str:
    one, five, _ = os.getloadavg()
    return (f"machine: {os.cpu_count()} cores, load average {one:.2f} (1 min) {five:.2f} (5 min); "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def warn_if_busy(stage: str = "before the run") -> bool:
    """Prints a warning when the 1-minute load is above half the cores; True if busy. Call it
    before the work: afterwards the load includes the benchmark's own busy cores."""
    one = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    busy = one > 0.5 * cores
    if busy:
        print(f"WARNING: load average {one:.1f} on {cores} cores {stage}: the machine is busy, "
              "these are not quiet-machine figures", flush=True)
    return busy


def interleave(impls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each implementation, called in turn ``repeats`` times (A B A B)."""
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def median_range(values: list[float], fmt: str = ".3f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"
