"""Train an embedder.

    python -m reasonembed_jax.train --config configs/NAME.py[:ARG] --workdir DIR \\
        [--config.a.b=value ...] [--dry_run]

The config file defines ``get_config(arg)`` returning an ``ml_collections.ConfigDict``; ``ARG``
lists the file's variants, comma-separated (an unknown one is an error naming the allowed ones);
every field can be overridden on the command line and an unknown key is an error that names it.
A restart with the same workdir resumes from the newest checkpoint. Exit codes: 0 finished,
2 bad settings or input (one line), 75 stopped by SIGTERM after saving a checkpoint (requeue
the same command), 1 a bug (traceback). ``--dry_run`` compiles the
step for every configured domain shape and prints the per-device memory plan without loading
weights or data (add ``--xla_force_host_platform_device_count=N`` to XLA_FLAGS to plan an
N-device mesh on a laptop).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally followed by ':ARG' for get_config(ARG).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exports.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Compile the step and print the per-device memory plan; no training.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs (not needed on "
    "Cloud TPU pods or under SLURM, where it is detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config"])


def config_differences(ours: ml_collections.ConfigDict, other: ml_collections.ConfigDict
                       ) -> list[tuple[str, object, object]]:
    """``(dotted field, ours, other)`` for every leaf that differs, in field order."""
    def leaves(c: object, prefix: str = "") -> dict[str, object]:
        if isinstance(c, ml_collections.ConfigDict):
            out = {}
            for k in c.keys():
                out.update(leaves(c[k], f"{prefix}{k}."))
            return out
        if isinstance(c, dict):
            return {prefix[:-1]: {k: dict(v) if isinstance(v, dict) else v for k, v in c.items()}}
        return {prefix[:-1]: c}

    a, b = leaves(ours), leaves(other)
    return [(k, a.get(k), b.get(k)) for k in list(a) + [k for k in b if k not in a]
            if a.get(k) != b.get(k)]


def print_differences(spec: str, config: ml_collections.ConfigDict) -> None:
    """Prints every field where ``config`` (variants and overrides applied) differs from the
    config file's own default (``get_config(None)``: our recipe)."""
    from reasonembed_jax.training.config import load_config_file

    path = spec.partition(":")[0]
    diffs = config_differences(load_config_file(path), config)
    print(f"resolved config vs {path} (our recipe): {len(diffs) or 'no'} difference(s)")
    for field, ours, resolved in diffs:
        print(f"  {field}: {ours!r} -> {resolved!r}")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from reasonembed_jax.distributed import initialize

    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from reasonembed_jax.cli import Preempted, run_cli
    from reasonembed_jax.training.checkpoint import quiet_orbax_errors
    from reasonembed_jax.training.trainer import train

    if not _DRY_RUN.value and not _WORKDIR.value:
        raise app.UsageError("--workdir is required (except with --dry_run)")
    quiet_orbax_errors()

    def run(_: object) -> int:
        if _DRY_RUN.value:
            print_differences(config_flags.get_config_filename(flags.FLAGS["config"]), _CONFIG.value)
        result = train(_CONFIG.value, _WORKDIR.value or "", dry_run=_DRY_RUN.value)
        if not _DRY_RUN.value and result is not None:
            summary = {k: v for k, v in result.items() if k not in ("history", "state", "frozen")}
            if result.get("history"):
                summary["last"] = result["history"][-1]
            print(json.dumps(summary, indent=2, default=str), flush=True)
            if "stopped_at" in result:
                raise Preempted(f"stopped at step {result['stopped_at']} after SIGTERM; the "
                                "checkpoint is saved: rerun the same command to resume")
        return 0

    # Exit codes: 0 done, 2 user error (one line), 75 preempted (requeue), 1 a bug (traceback).
    run_cli(run)


if __name__ == "__main__":
    app.run(main)
