"""Saving and restoring a run's complete state with orbax.

Orbax writes each step into a temporary directory and renames it only once complete, and the manager lists
only finalised steps, so a checkpoint cut short by a kill is never picked over the last good one.
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
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        try:
            self.manager.save(step, args=ocp.args.StandardSave(_flat(state)[0]), force=True)
            self.manager.wait_until_finished()
        except OSError as e:
            last = self.latest_step()
            raise CheckpointError(f"could not write the checkpoint of step {step} to {self.directory}: {e}. "
                                  f"The last good checkpoint is step {last}.") from None

    def restore(self, step: int, abstract_state: Any) -> Any:
        kept, leaves, treedef = _flat(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(kept))
        return _unflat(restored, leaves, treedef)

    def close(self) -> None:
        self.manager.close()
