"""Orbax checkpoints of the train state and the data iterator position.

A save is asynchronous; Orbax writes into a temporary folder and renames it when complete, so
a kill mid-save leaves no half checkpoint under a step name. If the newest checkpoint still
fails to restore (damaged files), it is moved to ``<directory>.damaged/`` (so that step is saved
again when the run reaches it), the previous one is used and a warning says so.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
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
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, state, data_state)`` of the newest checkpoint that restores, or None."""
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of a pytree of arrays, for restoring into the same layout."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )

