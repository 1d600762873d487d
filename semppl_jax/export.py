"""The released checkpoint format (``pretrain.pkl``): export from ours, import for evaluation.

Format (``checkpoint_format.md``): a pickle of ``{"experiment_state": {...},
"step": int}`` whose ``experiment_state`` holds Haiku mappings
``online_params``/``online_state`` (and ``target_params``/``target_state``)
with a leading replica axis of size 1 on every leaf, as plain numpy arrays.
"""

from __future__ import annotations

import pickle
from typing import Any

import jax
import numpy as np
from etils import epath

from semppl_jax.errors import CheckpointError, MissingDataError

REQUIRED = ("online_params", "online_state")
# What a released-format pickle may construct: numpy arrays, dtypes and scalars, and
# mappings. Anything else (e.g. ``os.system`` via ``__reduce__``) is refused unread.
SAFE_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
     ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"),
     ("haiku._src.data_structures", "FlatMap"), ("haiku._src.data_structures", "FlatMapping"),
     ("haiku._src.data_structures", "to_haiku_dict")}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks to load something no released checkpoint holds."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_GLOBALS:
            raise RefusedPickle(f"{module}.{name}")
        return super().find_class(module, name)


def _safe_loads(data: bytes) -> Any:
    import io

    return _ArraysOnly(io.BytesIO(data)).load()


def _numpy_tree(tree: Any, add_replica_axis: bool) -> dict:
    return {module: {name: (np.asarray(v)[None] if add_replica_axis else np.asarray(v))
                     for name, v in values.items()}
            for module, values in tree.items()}


def export_pretrain_pkl(state: Any, path: str) -> str:
    """Writes ``state`` (our TrainState) as a released-format pickle, atomically."""
    experiment_state = {
        "online_params": _numpy_tree(jax.device_get(state.online_params), True),
        "online_state": _numpy_tree(jax.device_get(state.online_state), True),
        "target_params": _numpy_tree(jax.device_get(state.target_params), True),
        "target_state": _numpy_tree(jax.device_get(state.target_state), True),
    }
    payload = {"experiment_state": experiment_state, "step": int(jax.device_get(state.step))}
    path = epath.Path(path)
    if path.is_dir():
        path = path / "pretrain.pkl"
    tmp = path.parent / f"{path.name}.tmp"
    tmp.write_bytes(pickle.dumps(payload, protocol=4))
    tmp.replace(path)
    return str(path)


def load_pretrain_pkl(path: str) -> tuple[dict, dict, int]:
    """Reads a released-format pickle -> (online params, online state, step), replica axis removed.

    Accepts the file or its directory (the reference reader's ``<root>/pretrain.pkl``).
    """
    path = epath.Path(path)
    if path.is_dir():
        path = path / "pretrain.pkl"
    if not path.exists():
        raise MissingDataError(f"no released-format checkpoint at {str(path)!r}")
    try:
        payload = _safe_loads(path.read_bytes())
    except RefusedPickle as e:
        raise CheckpointError(f"{str(path)!r} was refused unread: it asks to load {e}, which a released checkpoint "
                              f"never holds (only arrays and mappings), and loading it could run code") from e
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable pretrain.pkl (truncated or corrupt?): {e!r}") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("experiment_state"), dict):
        keys = list(payload)[:5] if isinstance(payload, dict) else "-"
        raise CheckpointError(f"{str(path)!r}: expected a dict with an 'experiment_state' dict "
                              f"(found {type(payload).__name__}, keys {keys})")
    exp = payload["experiment_state"]
    missing = [k for k in REQUIRED if k not in exp]
    if missing:
        raise CheckpointError(f"{str(path)!r}: experiment_state lacks {missing}")

    def first_replica(tree: dict, what: str) -> dict:
        return {module: {name: _checked(np.asarray(v), str(path), f"{what} {module}/{name}")
                         for name, v in values.items()} for module, values in tree.items()}

    return (first_replica(exp["online_params"], "parameter"), first_replica(exp["online_state"], "state"),
            int(payload.get("step", 0)))


def _checked(arr: np.ndarray, path: str, what: str) -> np.ndarray:
    """A released array's first replica, refused unless it has a leading replica axis and is
    floating point and finite (BatchNorm's step counters: integer): weights that are NaN,
    whole numbers or empty would evaluate to chance without a word."""
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise CheckpointError(f"{path!r}: {what} has {'no' if arr.ndim == 0 else 'an empty'} leading replica axis "
                              f"(shape {arr.shape}); the released format keeps one replica first")
    if what.endswith("/counter"):  # BatchNorm's moving-average step counters: the one integer state
        if not np.issubdtype(arr.dtype, np.integer):
            raise CheckpointError(f"{path!r}: {what} holds {arr.dtype} values; a step counter is an integer")
        return arr[0]
    if not np.issubdtype(arr.dtype, np.floating):
        raise CheckpointError(f"{path!r}: {what} holds {arr.dtype} values; the released weights are floating point")
    first = arr[0]
    if not np.all(np.isfinite(first)):
        raise CheckpointError(f"{path!r}: {what} holds {int((~np.isfinite(first)).sum())} non-finite values "
                              f"(NaN or inf) of {first.size}")
    return first
