"""Orbax checkpoints of the train state and the data iterator position, and preemption (SIGTERM
turns into a saved checkpoint and a clean stop).

A save is asynchronous; Orbax writes into a temporary folder and renames it when complete, so
a kill mid-save leaves no half checkpoint under a step name. If the newest checkpoint still
fails to restore (damaged files), it is moved to ``<directory>.damaged/`` (so that step is saved
again when the run reaches it), the previous one is used and a warning says so.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves ``{"state": pytree, "data": JSON}`` every ``every`` steps, keeping the last ``keep``."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(every, 1),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], *, force: bool = False) -> bool:
        """Saves if ``step`` is on the interval (or ``force``); returns whether it saved."""
        if not force and (self.every <= 0 or step % self.every):
            return False  # (Orbax on its own would also save the very first step it sees)
        self._saving = step
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=ocp.args.JsonSave(data_state)),
                force=force,
            )
        except Exception as err:  # noqa: BLE001 (a write failure, e.g. of the previous async save)
            raise self._write_error(err) from err
        if not saved:
            log.warning("checkpoint step %d was not saved in %s (Orbax declined: step exists?)",
                        step, self.directory)
        return saved

    def _write_error(self, err: BaseException) -> OSError:
        """One line naming the directory and what is still there: a full disk says so."""
        self._failed = True
        text = " ".join((str(err).splitlines() or [type(err).__name__])[0].split())
        full = getattr(err, "errno", None) == errno.ENOSPC or any(
            marker in str(err) for marker in ENOSPC_MARKERS)
        step = getattr(self, "_saving", None)
        if step is not None:  # free the space the half-written step took
            shutil.rmtree(os.path.join(self.directory, f"{step}{ocp_tmp_suffix()}"),
                          ignore_errors=True)
        kept = [s for s in self.steps() if s != step]
        intact = (f"the previous checkpoint (step {kept[-1]}) is intact" if kept
                  else "no earlier checkpoint exists")
        if full:
            return OSError(errno.ENOSPC, f"No space left on device while writing checkpoint step "
                           f"{step}; {intact}; free space and rerun to resume", self.directory)
        return OSError(getattr(err, "errno", None) or errno.EIO,
                       f"cannot write checkpoint step {step} ({text[:300]}); {intact}",
                       self.directory)

    def restore_latest(self, abstract_state: Any, accept: Any = None
                       ) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, state, data_state)`` of the newest checkpoint that restores (and that
        ``accept(state)`` approves, e.g. finite parameters), or None."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                            data=ocp.args.JsonRestore()),
                )
            except Exception as err:  # noqa: BLE001 (any failure means: try the previous one)
                log.warning("checkpoint at step %d in %s cannot be restored (%s: %s); "
                            "falling back to the previous checkpoint", step, self.directory,
                            type(err).__name__, (str(err).splitlines() or [""])[0][:200])
                self.quarantine(step)
                continue
            if accept is not None and not accept(restored["state"]):
                log.warning("checkpoint at step %d in %s holds non-finite values; falling back to "
                            "the previous checkpoint", step, self.directory)
                self.quarantine(step)
                continue
            if step != steps[-1]:
                log.warning("resumed from step %d, not the newest step %d", step, steps[-1])
            return step, restored["state"], dict(restored["data"])
        return None

    def quarantine(self, step: int) -> str:
        """Moves a damaged step out of the way (to ``<directory>.damaged/<step>-<n>``), so the run
        saves that step again when it gets there instead of redoing it on every restart
        (Orbax refuses to save over an existing step). Returns the new place."""
        target_dir = self.directory + ".damaged"
        src = os.path.join(self.directory, str(step))
        n = 0
        while os.path.exists(dst := os.path.join(target_dir, f"{step}-{n}")):
            n += 1
        if jax.process_index() == 0 and os.path.isdir(src):
            os.makedirs(target_dir, exist_ok=True)
            os.replace(src, dst)
            log.warning("moved the damaged checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()
        return dst

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 (the background save failed)
            raise self._write_error(err) from err

    def close(self) -> None:
        if getattr(self, "_failed", False):  # already reported; do not raise it a second time
            try:
                self.manager.wait_until_finished()
                self.manager.close()
            except Exception:  # noqa: BLE001, S110
                pass
            return
        self.wait()
        self.manager.close()


# How a full disk reads in errors that carry no errno (TensorStore's, as Orbax re-raises them).
ENOSPC_MARKERS = ("No space left on device", "os_error_code='28'", "RESOURCE_EXHAUSTED")


def ocp_tmp_suffix() -> str:
    """The suffix Orbax gives a step folder while it is being written."""
    return ".orbax-checkpoint-tmp"


class _DropOrbaxErrorTracebacks(logging.Filter):
    """Orbax logs a background save failure several times, each with a traceback; the
    ``Checkpointer`` reports it once, in one line. Drops those ERROR records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def quiet_orbax_errors() -> None:
    """For the CLI: leave Orbax's write-failure reporting to ``Checkpointer`` (one line)."""
    for name in ("absl", "orbax"):
        logging.getLogger(name).addFilter(_DropOrbaxErrorTracebacks())


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of a pytree of arrays, for restoring into the same layout."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


class Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (save, then exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))
