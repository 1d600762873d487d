"""Resumable train state with Orbax: when to save is decided the same way on every process.

The state pytree holds everything a step reads (online/target params and BN
state, optimizer state, the pseudo-label queue, step, RNG); the input position
is the step itself, because the input pipeline is a pure function of
(seed, step) (``input_pipeline.train_dataset(start_step=...)``).

Every decision that leads into Orbax's collective save is one that all
processes reach identically, with Orbax's own mechanisms:
- a fixed step interval (``FixedIntervalPolicy``: a pure function of the step);
- a time interval decided on the primary host and broadcast
  (``ContinuousCheckpointingPolicy``), never each host's own clock;
- preemption: JAX's preemption sync manager turns a SIGTERM on any host into
  one agreed step on all hosts (``reached_preemption``).
Orbax writes each checkpoint to a temporary directory and renames it once
complete; ``cleanup_tmp_directories`` removes what a killed save left behind.

The checkpoint's metadata records the fields that define the run
(``run_signature``): a resume with other values is refused, naming each field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from semppl_jax import multihost
from semppl_jax.errors import CheckpointError, ConfigError, MissingDataError, WorkdirError
from semppl_jax.paths import io_error, workdir_path
from semppl_jax.preemption import Preempted

T = TypeVar("T")

# Fields that define the encoder (its shapes, or how the same parameters are applied: the
# stem's pool and stride): never allowed to change on resume or evaluation.
ENCODER_FIELDS = ("depth", "width_multiplier", "resnet_v2", "sk_ratio", "stem_max_pool", "stem_stride")
ARCH_FIELDS = ENCODER_FIELDS + ("projector_hidden_size", "predictor_hidden_size", "projection_size")
HEAD_MODULES = ("projector", "predictor", "classifier")  # not part of the encoder an evaluation reads
SHAPE_KEYS = tuple(f"model.{k}" for k in ARCH_FIELDS) + ("semppl.queue_size", "num_classes")
# Every other field changes what a run computes (data, labels, seeds, method, optimizer,
# BatchNorm, precision, views, augmentation, batch, schedule) and is in the resume check,
# but for these, which only say where things are, how often to log or save, or how to lay
# out or recompute the same numbers (the schedule's length is checked as total_steps).
NOT_COMPUTING = ("job", "dataset.data_dir", "dataset.subset_cache_dir", "dataset.fetch_subsets",
                 "training.num_epochs", "training.num_steps", "training.batch_per_device",
                 "training.max_batch_fraction", "training.log_every_steps", "training.checkpoint_every_steps",
                 "training.checkpoint_every_minutes", "training.keep_checkpoints", "training.eval_every_steps",
                 "training.eval_max_examples", "training.profile_first_step", "training.profile_num_steps",
                 "training.collapse_std_fraction", "training.collapse_loss_ratio", "training.stop_on_collapse",
                 "model.remat", "augment.blur_impl", "views.transpose_images",
                 "dataset.eval_split",  # the online k-NN's test split: a monitor
                 "folder_preset.resolved")  # the values it sets are compared themselves
NOT_COMPUTING_SECTIONS = ("eval.",)  # how the encoder is evaluated afterwards


class ConfigDriftError(ConfigError):
    """A resume whose config differs from the checkpoint's in fields that define the run."""


def arch_signature(config: Any, num_classes: int) -> dict:
    sig = {f"model.{k}": config.model[k] for k in ARCH_FIELDS}
    sig["semppl.queue_size"] = config.semppl.queue_size
    sig["num_classes"] = num_classes
    return sig


def run_signature(config: Any, num_classes: int, total_steps: int) -> dict:
    """Everything a resume must agree on: every field that changes what the run computes
    (see ``NOT_COMPUTING``), the class count and the schedule's length."""
    flat = json.loads(json.dumps(_flatten(config.to_dict())))  # tuples as lists, as the meta keeps them
    sig = {k: v for k, v in flat.items() if k not in NOT_COMPUTING and not k.startswith(NOT_COMPUTING_SECTIONS)}
    sig.update(arch_signature(config, num_classes), total_steps=total_steps)
    return sig


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def drift(saved: dict, wanted: dict) -> dict[str, tuple[Any, Any]]:
    """Fields whose checkpoint value differs from the config's (keys absent from an older
    checkpoint are not reported)."""
    return {k: (saved[k], v) for k, v in wanted.items() if k in saved and saved[k] != v}


def check_resume(saved: dict, wanted: dict, directory: str, allow_change: bool = False) -> dict[str, tuple]:
    """The fields a resume changes (allowed ones only); refuses shapes always, others unless allowed."""
    changed = drift(saved, wanted)
    if not changed:
        return {}
    detail = "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in changed.items())
    shape = [k for k in changed if k in SHAPE_KEYS]
    if shape:
        raise ConfigDriftError(f"the checkpoint in {directory} was made with another model ({detail}); "
                               f"use a new workdir or the original config")
    if not allow_change:
        raise ConfigDriftError(f"resuming {directory} with a config that differs from the run's ({detail}). "
                               f"Use a new workdir, restore the original values, or pass "
                               f"--allow_config_change if the change is deliberate (it is recorded in "
                               f"config_history.jsonl).")
    return changed


def record_changes(workdir: Any, step: int, changes: dict[str, tuple]) -> None:
    """Appends a resume's allowed changes to ``WORKDIR/config_history.jsonl`` (process 0)."""
    from semppl_jax import appendable

    path = workdir_path(workdir) / "config_history.jsonl"
    entry = {k: {"was": a, "now": b} for k, (a, b) in changes.items()}
    if appendable.exists(path):  # a resume that stopped before saving records the same change again
        lines = [json.loads(line) for line in appendable.read_text(path).splitlines() if line.strip()]
        if lines and lines[-1]["step"] == step and lines[-1]["changes"] == json.loads(json.dumps(entry)):
            return
    history = appendable.AppendOnlyFile(path)
    history.write(json.dumps(dict(step=step, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  changes=entry)) + "\n")
    history.close()


def save_policy(every_steps: int | None, every_minutes: float | None) -> policies.AnySavePolicy:
    """Preemption (agreed step), every N steps, and every M minutes as decided by the
    primary host. The time policy also saves at a fresh run's first step, which checks
    early that the checkpoint directory is writable."""
    chosen: list[Any] = [policies.PreemptionCheckpointingPolicy()]
    if every_steps:
        chosen.append(policies.FixedIntervalPolicy(int(every_steps)))
    if every_minutes:
        chosen.append(policies.ContinuousCheckpointingPolicy(minimum_interval_secs=int(60 * every_minutes)))
    return policies.AnySavePolicy(chosen)


class Checkpointer:
    def __init__(self, directory: str, keep: int, every_steps: int | None = None,
                 every_minutes: float | None = None, async_save: bool = True, read_only: bool = False):
        self.directory = workdir_path(directory)  # a bucket stays a bucket
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save,
            save_decision_policy=save_policy(every_steps, every_minutes),
            cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any process got a preemption notice."""
        return self._manager.reached_preemption(step)

    def should_save(self, step: int) -> bool:
        """The save policy's decision for ``step``: identical on all processes."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves unconditionally (call it on all processes, after an agreed decision). A save that
        the storage refuses (a full disk: an asynchronous save's error surfaces at the next one)
        stops the run with a message; the last complete checkpoint stays intact."""
        with self._storage_errors(f"saving checkpoint step {step}"):
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    @contextlib.contextmanager
    def _storage_errors(self, what: str):
        try:
            yield
        except Exception as e:
            if not io_error(e):
                raise
            complete = latest_step(self.directory.parent) if self.directory.name == "checkpoints" else None
            raise WorkdirError(f"{what} to {self.directory} failed: {str(e).splitlines()[0][:300]}. The last "
                               f"complete checkpoint (step {complete}) is intact; free space or fix the "
                               f"storage, then rerun to resume") from e

    def read_meta(self, step: int | None = None) -> dict:
        step = self._manager.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, int]:
        """Restores into the shapes/shardings of ``abstract_state``."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"], step

    def wait(self) -> None:
        with self._storage_errors("saving the last checkpoint"):
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._storage_errors("saving the last checkpoint"):
            self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def latest_step(workdir: str | epath.Path) -> int | None:
    """The newest complete checkpoint's step in ``workdir`` (None if none).

    Lists finalized step directories only, without opening a manager, so it is safe
    while a live run saves and deletes old steps in the same directory.
    """
    directory = workdir_path(workdir) / "checkpoints"
    steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
    return max(steps, default=None)


READ_ATTEMPTS = 8


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a checkpoint argument is read as: decided once, on process 0, for every process."""

    kind: str  # 'orbax' (a step directory of a workdir) or 'pickle' (a released-format pretrain.pkl)
    location: str
    step: int | None  # None: a pickle given by path, whose step is read with it
    loaded: Any = None  # process 0's copy of a pickle it read to learn its step


class StepVanished(Exception):
    """The chosen step was deleted while it was read (a live run keeps only its newest)."""


def resolve(checkpoint: str, pickles: bool = True) -> Resolved:
    """``checkpoint`` (a workdir, or a ``.pkl``) as what to read: a workdir's newest step, or its
    ``pretrain.pkl`` when that is at least as new (``pickles``). A damaged ``pretrain.pkl`` beside
    checkpoints is skipped, with a warning naming it; process 0 decides, every process is told."""
    from absl import logging

    from semppl_jax import export

    if checkpoint.endswith(".pkl"):
        return Resolved("pickle", checkpoint, None)
    read_here: list = []

    def decide() -> dict:
        root = workdir_path(checkpoint)
        newest = latest_step(root)
        pkl = root / "pretrain.pkl"
        if pickles and pkl.exists():
            try:
                read_here.append(export.load_pretrain_pkl(str(pkl)))
            except CheckpointError as e:
                if newest is None:
                    raise
                logging.warning("skipping %s (%s); reading the workdir's checkpoint step %d instead (set "
                                "--config.eval.checkpoint to a file to choose)", pkl, e, newest)
            else:
                if newest is None or read_here[0][2] >= newest:
                    return dict(kind="pickle", location=str(pkl), step=read_here[0][2])
        if newest is None:
            raise MissingDataError(f"{checkpoint!r} holds neither checkpoints/ nor a pretrain.pkl to read")
        return dict(kind="orbax", location=str(root / "checkpoints" / str(newest)), step=newest)

    told = multihost.decided_by_process_zero(decide)
    return Resolved(**told, loaded=read_here[0] if read_here and told["kind"] == "pickle" else None)


def read_newest(checkpoint: str, read: Callable[[Resolved], T], pickles: bool = True) -> T:
    """``read(resolve(checkpoint))``, resolved again while a live run deletes the chosen step."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read(resolve(checkpoint, pickles))
        except StepVanished:
            time.sleep(0.05 * 2 ** attempt)
    raise RuntimeError(f"{checkpoint}: the newest checkpoint was deleted while being read {READ_ATTEMPTS} times; "
                       f"is a run saving faster than it can be read?")


def _reader(handler: type) -> ocp.Checkpointer:
    """A checkpointer that reads on this process alone: no barrier with the others, which
    agree on the outcome afterwards (``_read_step``), so a read failing on one process
    cannot leave the others in Orbax's barrier and this one in the agreement."""
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    return ocp.Checkpointer(handler(multiprocessing_options=alone), multiprocessing_options=alone)


def _read_step(path: epath.Path, config: Any, newest: bool, signature: Callable[[int], dict],
               read: Callable[[epath.Path, Any, jax.sharding.Sharding], T]) -> T:
    """``read(step directory, abstract train state, this process's first device)``, after refusing
    a checkpoint whose ``signature`` fields differ from the config's; every process reads alike.

    Only that step's directory is opened (no manager listing every step), so a live run saving
    beside the reader is harmless. A ``newest`` step deleted while it is read raises
    :class:`StepVanished` on every process; any other failure, on any process, fails every process.
    """
    from semppl_jax import update_step

    directory = path.parent
    outcome, value = "ok", None
    try:
        if not path.is_dir():
            raise MissingDataError(
                f"no checkpoint {path} (complete steps: {sorted(ocp.utils.checkpoint_steps(directory))})")
        meta = _reader(ocp.JsonCheckpointHandler).restore(path / "meta", args=ocp.args.JsonRestore())
        check_resume(meta, signature(meta["num_classes"]), path)
        shapes = jax.eval_shape(lambda: update_step.init_state(config, jax.random.key(0), meta["num_classes"], 1, 1))
        value = read(path, shapes, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    except ConfigDriftError as e:
        outcome, value = "error", e
    except Preempted as e:  # told to the others, who stop too
        outcome, value = "preempted", e
    except Exception as e:  # noqa: BLE001 - a step being deleted by the run, or a real error
        # The run deletes old steps (``keep``): a step it is deleting may still be listed while its
        # files go, but it is never the newest. A failed newest step is an error.
        steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
        chosen = int(path.name)
        vanished = newest and (chosen not in steps or chosen != max(steps, default=chosen))
        outcome, value = ("vanished" if vanished else "error"), e
    outcomes = multihost.allgather_json(outcome)
    if outcome in ("error", "preempted"):
        raise value
    if "preempted" in outcomes:
        raise Preempted()
    if "error" in outcomes:
        raise RuntimeError(f"reading checkpoint {path} failed on process {outcomes.index('error')} (see its log)")
    if "vanished" in outcomes:
        raise StepVanished(str(path))
    return value


def _read_checkpoint(workdir: str, config: Any, step: int | None, signature: Callable[[int], dict],
                     read: Callable[[epath.Path, Any, jax.sharding.Sharding], T]) -> T:
    """``_read_step`` on ``step`` of ``workdir``, or on its newest step (chosen on process 0, and
    again while a live run deletes it)."""
    directory = workdir_path(workdir) / "checkpoints"  # Orbax reads absolute paths only
    if step is not None:
        return _read_step(directory / str(step), config, False, signature, read)
    return read_newest(workdir, lambda r: _read_step(epath.Path(r.location), config, True, signature, read),
                       pickles=False)


def restore_encoder(workdir: str, config: Any, step: int | None = None, newest: bool = False
                    ) -> tuple[dict, dict, int]:
    """The online encoder's parameters and state from ``workdir`` (latest, or ``step``; ``newest``:
    ``step`` was resolved as the newest, so its vanishing is reported, not an error), alone.

    A partial restore: the heads, queue, optimizer state and target network are not
    read, so an evaluation config whose queue, optimizer or head sizes differ works. Arrays go
    to this process's first device (every process can address it), and come back
    as host numpy trees. A different encoder is refused, naming the field.
    """
    def encoder_only(tree: dict) -> dict:
        return {m: v for m, v in tree.items() if m.split("/")[0] not in HEAD_MODULES}

    def read(path: epath.Path, shapes: Any, device: jax.sharding.Sharding) -> tuple[dict, dict, int]:
        wanted = {"online_params": encoder_only(shapes.online_params),
                  "online_state": encoder_only(shapes.online_state)}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), wanted)
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)
        restored = _reader(ocp.PyTreeCheckpointHandler).restore(
            path / "state", args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=restore_args, partial_restore=True))
        host = jax.device_get(restored)
        return host["online_params"], host["online_state"], int(path.name)

    def signature(_num_classes: int) -> dict:
        return {f"model.{k}": config.model[k] for k in ENCODER_FIELDS}

    if newest:  # a step resolved as the newest: one that vanishes raises StepVanished for a new choice
        return _read_step(workdir_path(workdir) / "checkpoints" / str(step), config, True, signature, read)
    return _read_checkpoint(workdir, config, step, signature, read)


def restore_state(workdir: str, config: Any, step: int | None = None) -> tuple[Any, int]:
    """The whole train state saved in ``workdir`` (latest, or ``step``), on this process's
    first device (addressable by every process). A different model is refused."""
    def read(path: epath.Path, shapes: Any, device: jax.sharding.Sharding) -> tuple[Any, int]:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
        state = _reader(ocp.StandardCheckpointHandler).restore(
            path / "state", args=ocp.args.StandardRestore(abstract))
        return state, int(path.name)

    return _read_checkpoint(workdir, config, step,
                            lambda num_classes: arch_signature(config, num_classes), read)
