"""Resumable train state with Orbax: async, atomic, last-K, and refused on a changed model.

The state pytree holds everything a step reads (online/target params and BN
state, optimizer state, the pseudo-label queue, step, RNG); the input position
is the step itself, because the input pipeline is a pure function of
(seed, step) (``input_pipeline.train_dataset(start_step=...)``).
Orbax writes each checkpoint to a temporary directory and renames it once
complete, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

# Fields that must not change across a resume: they define parameter shapes or
# the meaning of the state.
ARCH_FIELDS = ("depth", "width_multiplier", "resnet_v2", "sk_ratio", "projector_hidden_size",
               "predictor_hidden_size", "projection_size")


def arch_signature(config: Any, num_classes: int) -> dict:
    sig = {f"model.{k}": config.model[k] for k in ARCH_FIELDS}
    sig["semppl.queue_size"] = config.semppl.queue_size
    sig["num_classes"] = num_classes
    return sig


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def read_meta(self, step: int | None = None) -> dict:
        step = self._manager.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, meta: dict, step: int | None = None) -> tuple[Any, int]:
        """Restores into the shapes/shardings of ``abstract_state``; refuses a changed model."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        saved_meta = self.read_meta(step)
        changed = {k: (saved_meta.get(k), v) for k, v in meta.items() if saved_meta.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"the checkpoint in {self.directory} was made with another model "
                             f"({detail}); use a new workdir or the original config")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"], step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_state(workdir: str, config: Any, step: int | None = None) -> tuple[Any, int]:
    """The train state saved in ``workdir`` (latest, or ``step``), on the default device."""
    from semppl_jax import update_step

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
    meta = ckpt.read_meta(step)
    shapes = jax.eval_shape(lambda: update_step.init_state(config, jax.random.key(0), meta["num_classes"], 1, 1))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    state, step = ckpt.restore(abstract, meta, step)
    ckpt.close()
    return state, step
