"""Saving and restoring a run's complete state with orbax.

Orbax writes each step into a temporary directory and renames it only once complete, and the manager lists
only finalised steps, so a checkpoint cut short by a kill is never picked over the last good one. Writing is
asynchronous: training continues while the files of the last checkpoint are written.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def _flat(tree) -> tuple[dict, list, Any]:
    """Non-empty leaves keyed by position (orbax cannot save zero-size arrays, which mjx.Data has many of)."""
    leaves, treedef = jax.tree.flatten(tree)
    kept = {f"{i:06d}": x for i, x in enumerate(leaves) if x.size}
    return kept, leaves, treedef


def _unflat(kept: dict, abstract_leaves: list, treedef) -> Any:
    leaves = [kept[f"{i:06d}"] if x.size else jnp.zeros(x.shape, x.dtype) for i, x in enumerate(abstract_leaves)]
    return jax.tree.unflatten(treedef, leaves)


class CheckpointError(RuntimeError):
    pass


class Checkpoints:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                 enable_async_checkpointing=True))
        self._pending: int | None = None  # the step being written in the background

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Start writing `state` as checkpoint `step` and return once it has been copied off the device: the files
        are written in the background while training goes on (orbax copies device arrays to host memory before
        `save` returns, so the next chunk may donate them). A save first waits for the previous one, and raises
        if that one failed."""
        self.wait()
        try:
            self.manager.save(step, args=ocp.args.StandardSave(_flat(state)[0]), force=True)
        except OSError as e:
            self._failed(step, e)
        self._pending = step

    def wait(self) -> None:
        """Block until the checkpoint being written (if any) is complete; raise CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            self._failed(self._pending, e)
        finally:
            self._pending = None

    def _failed(self, step: int | None, error: OSError):
        self._pending = None
        raise CheckpointError(f"could not write the checkpoint of step {step} to {self.directory}: {error}. "
                              f"The last good checkpoint is step {self.latest_step()}.") from None

    def restore(self, step: int, abstract_state: Any) -> Any:
        kept, leaves, treedef = _flat(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(kept))
        return _unflat(restored, leaves, treedef)

    def close(self) -> None:
        """Finish the checkpoint being written (raising CheckpointError if it failed) and release the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()
