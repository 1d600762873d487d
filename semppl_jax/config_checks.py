"""Start-up validation: a wrong config stops before any compile, naming the field."""

from __future__ import annotations

from typing import Any

from semppl_jax.augment import BLURS
from semppl_jax.errors import ConfigError, near_misses  # noqa: F401  (ConfigError: callers' name for it)
from semppl_jax.networks import REMAT_POLICIES, RESNET_SPECS, scaled_channels


def apply_overrides(config: Any, overrides: list[str]) -> None:
    """``a.b=value`` strings onto an ml-collections config (what ``--set`` takes in the
    benchmark scripts). The value is read as JSON (numbers, booleans, lists) or else
    kept as a string; ml-collections' typed setter then converts it (an int into a
    float field) or refuses it (2.5 into an int field). An unknown field is an error."""
    import json

    config.lock()
    try:
        for item in overrides:
            path, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r}: expected field=value")
            try:
                value = json.loads(text)
            except json.JSONDecodeError:  # a string, or Python's spelling of a boolean
                value = {"True": True, "False": False}.get(text, text)
            try:
                config.update_from_flattened_dict({path: value})
            except (KeyError, AttributeError) as e:
                raise ConfigError(f"override {item!r}: the config has no field {path!r}") from e
            except TypeError as e:
                raise ConfigError(f"override {item!r}: {e}") from e
    finally:
        config.unlock()


def fields(config: Any, prefix: str = "") -> list[str]:
    """Every field of a config, as dotted paths."""
    out = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        out += fields(value, path + ".") if hasattr(value, "items") and not isinstance(value, str) else [path]
    return out


def explain_override_error(config_arg: str | None, argv: list[str], error: Exception) -> str | None:
    """The message for a ``--config.<path>=`` override that names no field of the config
    (its full path and the closest fields), or None when the error is something else."""
    import importlib.util

    if not config_arg:
        return None
    path, _, arg = config_arg.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_semppl_config_for_message", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg or None)
    except Exception:  # noqa: BLE001 - the config itself is broken: absl's own message stands
        return None
    known = fields(config)
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            field = a[len("--config."):].split("=", 1)[0]
            if field not in known and not any(k.startswith(field + ".") for k in known):
                return (f"{a}: the config {config_arg} has no field {field!r}{near_misses(field, known)}. "
                        f"Every field is listed by python -c \"from {_module_name(path)} import get_config; "
                        f"print(get_config())\"")
    del error
    return None


def _module_name(path: str) -> str:
    return path[:-3].replace("/", ".") if path.endswith(".py") else path


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {message}")


def resolve_batch(config: Any, num_devices: int, num_train: int | None = None) -> None:
    """``training.batch_per_device`` (when set) into ``training.batch_size``: that many images a
    device, at most ``max_batch_fraction`` of the training images, a multiple of the devices."""
    t = config.training
    if t.batch_per_device is None:
        return
    _require(t.batch_per_device > 0, "training.batch_per_device", f"must be positive, got {t.batch_per_device}")
    per_device = t.batch_per_device
    if t.max_batch_fraction is not None and num_train is not None:
        per_device = min(per_device, max(1, int(t.max_batch_fraction * num_train) // num_devices))
    t.batch_size = per_device * num_devices


def validate(config: Any, num_devices: int, num_processes: int = 1, num_train: int | None = None,
             num_classes: int | None = None) -> None:
    """Every start-up rule, each failure naming its field (``ConfigError``)."""
    _training(config.training, config.dataset, num_devices, num_processes, num_train)
    _method(config.semppl, config.views, config.training)
    _views(config.views, config.augment, config.semppl.same_crop_pairs)
    _model(config.model)
    if num_classes is not None and config.semppl.knn_k > 0:
        _require(num_classes >= 2, "dataset.name", f"needs at least two classes, found {num_classes}")


def _training(t: Any, d: Any, num_devices: int, num_processes: int, num_train: int | None) -> None:
    _require(t.batch_size > 0, "training.batch_size", f"must be positive, got {t.batch_size}")
    _require(t.batch_size % num_devices == 0, "training.batch_size",
             f"{t.batch_size} is not divisible by the {num_devices} devices (use a multiple of {num_devices})")
    _require(t.batch_size % num_processes == 0, "training.batch_size",
             f"{t.batch_size} is not divisible by the {num_processes} processes")
    if t.num_steps is not None:
        _require(t.num_steps > 0, "training.num_steps", f"must be positive, got {t.num_steps}")
    else:
        _require(t.num_epochs > 0, "training.num_epochs", f"must be positive, got {t.num_epochs}")
    _require(t.compute_dtype in ("float32", "bfloat16"), "training.compute_dtype",
             f"must be 'float32' or 'bfloat16', got {t.compute_dtype!r}")
    if d.labelled_per_batch is not None:
        _require(0 < d.labelled_per_batch <= t.batch_size, "dataset.labelled_per_batch",
                 f"must be in (0, batch_size={t.batch_size}], got {d.labelled_per_batch}")
    _require(d.calibration_per_class >= 0, "dataset.calibration_per_class",
             f"must be 0 (no fold) or more, got {d.calibration_per_class}")
    if num_train is not None:
        _require(t.batch_size <= num_train, "training.batch_size",
                 f"{t.batch_size} is larger than the {num_train} training images")


def _method(s: Any, v: Any, t: Any) -> None:
    _require(s.queue_size > 0, "semppl.queue_size", f"must be positive, got {s.queue_size}")
    _require(1 <= s.knn_k <= s.queue_size, "semppl.knn_k",
             f"k={s.knn_k} must be between 1 and semppl.queue_size={s.queue_size}")
    _require(s.num_positives >= 1, "semppl.num_positives", f"must be >= 1, got {s.num_positives}")
    _require(s.temperature > 0, "semppl.temperature", f"must be positive, got {s.temperature}")
    _require(s.alpha >= 0 and s.lam >= 0 and s.c > 0, "semppl.alpha/lam/c",
             f"need alpha >= 0, lam >= 0, c > 0; got {s.alpha}, {s.lam}, {s.c}")
    _require(0.0 <= s.min_vote_share <= 1.0, "semppl.min_vote_share",
             f"must be in [0, 1] (0 keeps every vote), got {s.min_vote_share}")
    _require(0.0 <= s.min_vote_precision <= 1.0, "semppl.min_vote_precision",
             f"must be in [0, 1] (0: no measured threshold), got {s.min_vote_precision}")
    _require(s.gate_samples >= 1, "semppl.gate_samples", f"must be >= 1, got {s.gate_samples}")
    _require(0.0 <= s.gate_confidence < 1.0, "semppl.gate_confidence",
             f"must be in [0, 1) (0 or up to 0.5: the point estimate), got {s.gate_confidence}")
    _require(s.queue_size % v.num_large == 0, "semppl.queue_size",
             f"{s.queue_size} must be a multiple of views.num_large={v.num_large} (the gate reads "
             "each labelled image's views as one block of the queue)")
    _require(s.knn_query in ("target", "online"), "semppl.knn_query",
             f"must be 'target' or 'online', got {s.knn_query!r}")
    if s.num_negatives is not None:
        _require(1 <= s.num_negatives < t.batch_size, "semppl.num_negatives",
                 f"must be in [1, batch_size) = [1, {t.batch_size}), got {s.num_negatives}")


def _views(v: Any, a: Any, same_crop_pairs: bool) -> None:
    _require(v.num_large >= 1, "views.num_large", f"need at least one large view, got {v.num_large}")
    _require(v.num_small >= 0, "views.num_small", f"must be >= 0, got {v.num_small}")
    _require(v.num_large + v.num_small >= 2 or same_crop_pairs, "views.num_large",
             "need two views (or semppl.same_crop_pairs=True) to form a positive pair")
    for name in ("large_size", "small_size", "eval_resize", "eval_size"):
        _require(getattr(v, name) > 0, f"views.{name}", f"must be positive, got {getattr(v, name)}")
    _require(v.eval_size <= v.eval_resize, "views.eval_size",
             f"{v.eval_size} is larger than views.eval_resize={v.eval_resize}: the evaluation's centre crop "
             "is eval_size/eval_resize of an image's shorter side, at most all of it (set both)")
    for name in ("large_scale", "small_scale", "aspect_ratio"):
        lo, hi = getattr(v, name)
        _require(0 < lo <= hi, f"views.{name}", f"need 0 < low <= high, got {(lo, hi)}")
    _require(0.0 <= a.rotation_degrees <= 180.0, "augment.rotation_degrees",
             f"must be in [0, 180], got {a.rotation_degrees}")
    _require(a.blur_impl in BLURS, "augment.blur_impl", f"must be one of {sorted(BLURS)}, got {a.blur_impl!r}")


def _model(m: Any) -> None:
    _require(m.depth in RESNET_SPECS, "model.depth", f"{m.depth!r} is not one of {sorted(RESNET_SPECS)}")
    _require(m.remat in REMAT_POLICIES, "model.remat", f"{m.get('remat')!r} is not one of {sorted(REMAT_POLICIES)}")
    _require(m.stem_stride in (1, 2), "model.stem_stride",
             f"must be 2 (ResNet's stem) or 1 (small images at full resolution), got {m.stem_stride!r}")
    spec = RESNET_SPECS[m.depth]
    try:  # the network's own rule, checked at start rather than when it is built
        for channels in (spec.stem_channels, *spec.channels_per_group):
            scaled_channels(channels, m.width_multiplier)
    except ValueError as e:
        _require(False, "model.width_multiplier", str(e))
    if m.sk_ratio > 0:
        _require(spec.bottleneck, "model.sk_ratio",
                 f"selective kernels need a bottleneck ResNet (50+), not {m.depth!r}")
        _require(not m.resnet_v2, "model.sk_ratio", "selective kernels are implemented for ResNet v1 only")
