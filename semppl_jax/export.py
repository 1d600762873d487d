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


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a pretrain.pkl holds only arrays and "
                                         f"mappings, and loading anything else could run code")
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
        raise FileNotFoundError(f"no released-format checkpoint at {str(path)!r}")
    try:
        payload = _safe_loads(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise ValueError(f"{path!r} is not a readable pretrain.pkl (truncated or corrupt?): {e!r}") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("experiment_state"), dict):
        keys = list(payload)[:5] if isinstance(payload, dict) else "-"
        raise ValueError(f"{path!r}: expected a dict with an 'experiment_state' dict "
                         f"(found {type(payload).__name__}, keys {keys})")
    exp = payload["experiment_state"]
    missing = [k for k in REQUIRED if k not in exp]
    if missing:
        raise ValueError(f"{path!r}: experiment_state lacks {missing}")

    def first_replica(tree: dict, what: str) -> dict:
        out = {}
        for module, values in tree.items():
            out[module] = {}
            for name, v in values.items():
                arr = np.asarray(v)
                if arr.ndim == 0:
                    raise ValueError(f"{path!r}: {what} {module}/{name} has no leading replica axis")
                out[module][name] = arr[0]
        return out

    return (first_replica(exp["online_params"], "parameter"), first_replica(exp["online_state"], "state"),
            int(payload.get("step", 0)))
