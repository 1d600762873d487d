"""``--mode=check``: the preflight every launch runs first, on every host.

In seconds to a few minutes, before anything trains, each host checks:

- ``python``, ``jax``: Python 3.11+, jax and jaxlib alike and 0.10+, the same on every host;
- ``devices``: the platform and device count, and the processes the launcher expects;
- ``config``: the batch against the devices and processes, and every start-up rule;
- ``data``: each split found with its size (a dataset's metadata, a folder's listing);
- ``records``: the first record of this host's share read and decoded (access, format);
- ``labels``: the labelled subset (a list, a CSV or a fraction) resolved to images;
- ``step``: the update step compiled for this config, its memory against the device;
- ``workdir``: writable from this host, what every other host wrote there visible
  from it (a bucket or a shared filesystem), and no other live run holding it.

Every host's report is gathered and process 0 prints one table; every host
returns the same verdict, so the launcher exits with ``FAILED_EXIT_CODE`` on all
of them or goes on to train. A failing check never leaves a host behind in a
collective: collectives run on every host whatever the checks before them found.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from semppl_jax import datasets, label_subsets, multihost, sources, split_index

FAILED_EXIT_CODE = 78  # EX_CONFIG from sysexits.h: the preflight found a problem
MIN_PYTHON = (3, 11)
MIN_JAX = (0, 10)


@dataclasses.dataclass
class Item:
    name: str
    ok: bool
    detail: str


def _check(name: str, fn: Callable[[], str]) -> Item:
    """``fn()`` as an item: its return value is the detail; an exception is the failure."""
    t0 = time.time()
    try:
        detail = fn()
        ok = True
    except Exception as e:  # noqa: BLE001 - reported, never raised: every host must reach the gather
        detail, ok = f"{type(e).__name__}: {e}".strip(), False
    took = time.time() - t0
    return Item(name, ok, detail + (f" [{took:.0f} s]" if took >= 5 else ""))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def _python() -> str:
    v = sys.version_info
    if v[:2] < MIN_PYTHON:
        raise RuntimeError(f"Python {v.major}.{v.minor} at {sys.executable}; the pins need "
                           f"{'.'.join(map(str, MIN_PYTHON))}+ (launch/tpu_worker.sh makes such a venv)")
    return f"{v.major}.{v.minor}.{v.micro}"


def _jax() -> str:
    import jax
    import jaxlib

    jv, lv = jax.__version__, jaxlib.__version__
    if jv != lv:
        raise RuntimeError(f"jax {jv} with jaxlib {lv}: install matching versions")
    if _version(jv) < MIN_JAX:
        raise RuntimeError(f"jax {jv}; 0.10 or newer is needed (requirements.txt)")
    return f"jax {jv}, jaxlib {lv}"


def _devices(expect_processes: int | None, expect_platform: str | None) -> str:
    import jax

    platform = jax.devices()[0].platform
    detail = (f"{jax.device_count()} {platform} devices, {jax.local_device_count()} on each of "
              f"{jax.process_count()} processes" if jax.process_count() > 1
              else f"{jax.device_count()} {platform} devices, 1 process")
    problems = []
    if expect_processes is not None and jax.process_count() != expect_processes:
        problems.append(f"expected {expect_processes} processes")
    if expect_platform is not None and platform != expect_platform:
        problems.append(f"expected {expect_platform} devices")
    if problems:
        raise RuntimeError(f"{detail}; {', '.join(problems)} (did jax.distributed.initialize find the cluster?)")
    return detail


def _config(config: Any, cache_dir: str, overrides: dict | None) -> str:
    import jax

    from semppl_jax import config_checks, folder_preset

    folder_preset.resolve(config, cache_dir, overrides)
    config_checks.resolve_batch(config, jax.device_count())
    config_checks.validate(config, jax.device_count(), jax.process_count())
    t = config.training
    return f"batch {t.batch_size}: {t.batch_size // jax.device_count()} a device, {t.compute_dtype}"


def _splits(config: Any, cache_dir: str) -> tuple[str, dict]:
    """Each split's size, with no record read (a folder: one shared listing); the test
    split's classes mapped onto the training split's."""
    import jax

    from semppl_jax import config_checks

    d, found, parts = config.dataset, {}, []
    for role, split in (("train", d.train_split), ("test", d.eval_split)):
        source = datasets.load_source(d.name, split, d.data_dir, d.synthetic_size, d.synthetic_image_size,
                                      config.seed, d.labels_file, cache_dir)
        if role == "train" and d.unlabelled:
            source = sources.concat_sources(source, datasets.load_unlabelled(
                d.unlabelled, d.unlabelled_split, d.data_dir, cache_dir))
        if role == "test" and source.class_names and source.class_names != found["train"].class_names:
            source = datasets.align_classes(source, found["train"].class_names)
        found[role] = source
        parts.append(f"{role} {split!r}: {source.num_ids} images")
    train = found["train"]
    config_checks.resolve_batch(config, jax.device_count(), train.num_ids)
    config_checks.validate(config, jax.device_count(), jax.process_count(), train.num_ids, train.num_classes)
    return f"{d.name}: {'; '.join(parts)}, {train.num_classes} classes", found


def _labels(config: Any, train: Any) -> str:
    d = config.dataset
    if train.labels is None:  # a sequential source knows its labels once indexed: check the list alone
        if d.label_subset in label_subsets.SUBSET_FILES:
            path = label_subsets.resolve_subset_file(d.label_subset, d.subset_cache_dir, d.fetch_subsets)
            return f"{d.label_subset}: {len(label_subsets.read_subset_list(path))} names in {path}"
        return f"label_subset {d.label_subset}: chosen when the split is indexed"
    labelled, fold = datasets.pretraining_masks(config, train)  # a fold too large is named here
    if not (labelled | fold).any():
        raise ValueError(f"dataset.label_subset={d.label_subset!r} labels no training image")
    held = f", {int(fold.sum())} of them in the calibration fold" if fold.any() else ""
    return f"{d.label_subset}: {int((labelled | fold).sum())} labelled images of {train.num_ids}{held}"


def _one_record(source: Any) -> str:
    """Reads and decodes the first record of this host's share (access rights, format)."""
    import jax

    lo, hi = split_index.share_range(source.num_ids, jax.process_index(), jax.process_count())
    if hi <= lo:
        raise ValueError(f"this process's share of {source.num_ids} images is empty")
    for ex in source.records(np.arange(lo, lo + 1)).take(1):
        image = sources.decode(ex["image"], source.encoded).numpy()
        return f"image {lo} of {source.num_ids} read: {image.shape[0]}x{image.shape[1]}"
    raise ValueError(f"image {lo} could not be read")


def _step(config: Any, num_classes: int) -> str:
    """The update step compiled from shapes alone, its memory against this host's first device."""
    import jax

    from semppl_jax import memory, sharding, update_step

    mesh = sharding.make_mesh()
    steps = 1000
    state = jax.eval_shape(lambda: update_step.init_state(config, jax.random.key(0), num_classes, steps, 100))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    transposed = config.views.transpose_images
    step_fn = sharding.shard_step(update_step.make_update_step(config, num_classes, steps, 100), mesh, transposed)
    t0 = time.time()
    compiled = step_fn.lower(state, _abstract_batch(config, mesh)).compile()
    usage = memory.step_bytes(compiled)
    limit = memory.device_limit(jax.local_devices()[0])
    memory.check_fits(usage, limit, config, jax.device_count())
    peak = "no memory analysis" if usage is None else f"peak {usage['peak'] / memory.GIB:.2f} GiB a device"
    room = "" if limit is None else f" of {limit / memory.GIB:.1f} GiB"
    return f"compiled in {time.time() - t0:.1f} s; {peak}{room}"


def _abstract_batch(config: Any, mesh: Any) -> dict:
    """The global batch's shapes as the input pipeline makes them, laid out on ``mesh``."""
    import jax

    from semppl_jax import sharding

    v, b = config.views, config.training.batch_size
    shapes = dict(large=((b, v.num_large, v.large_size, v.large_size, 3), np.uint8),
                  small=((b, v.num_small, v.small_size, v.small_size, 3), np.uint8),
                  label=((b,), np.int32), is_labelled=((b,), np.bool_), image_id=((b,), np.int32),
                  true_label=((b,), np.int32))
    out = {}
    for name, (shape, dtype) in shapes.items():
        if v.transpose_images and name in sharding.IMAGE_KEYS:
            shape = shape[1:] + shape[:1]
        spec = sharding._batch_spec(name, len(shape), v.transpose_images)
        out[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
    return out


def _workdir(workdir: str) -> Item:
    """This host writes its own file and reads every other host's (collectives on every host)."""
    import jax

    from semppl_jax.paths import workdir_path

    nonce = multihost.decided_by_process_zero(lambda: uuid.uuid4().hex[:12])
    folder = workdir_path(workdir) / ".preflight" / nonce
    me, count = jax.process_index(), jax.process_count()

    def write_mine() -> str:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"process-{me}").write_text(nonce)
        return "written"

    wrote = _check("workdir", write_mine)
    multihost.barrier("semppl_preflight_written")
    if wrote.ok:
        def read_all() -> str:
            from semppl_jax import workdir_lock

            missing = [p for p in range(count) if not (folder / f"process-{p}").exists()]
            if missing:
                raise RuntimeError(f"{workdir}: the files of processes {missing} are not visible from here: "
                                   f"the workdir must be a bucket or a filesystem every host shares")
            holder, _ = workdir_lock.read_holder(workdir)
            if holder is not None and (holder.runs_here() if holder.here() else holder.recently_renewed()):
                raise RuntimeError(f"{workdir} is in use by another run ({holder.describe()})")
            return f"{workdir}: writable, shared by {count} process{'es' if count > 1 else ''}"

        wrote = _check("workdir", read_all)
    multihost.barrier("semppl_preflight_read")
    if me == 0:
        try:
            folder.rmtree()
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()
        except OSError:
            pass
    return wrote


def run(config: Any, workdir: str, expect_processes: int | None = None,
        expect_platform: str | None = None, overrides: dict | None = None) -> bool:
    """Every check on this host, the report printed by process 0; True where all hosts passed.
    ``overrides``: the ``--config.`` values, given again after the folder preset's choices."""
    import jax

    from semppl_jax.paths import workdir_path

    cache_dir = str(workdir_path(workdir) / "data_index")
    items = [_check("python", _python), _check("jax", _jax),
             _check("devices", lambda: _devices(expect_processes, expect_platform)),
             _check("config", lambda: _config(config, cache_dir, overrides))]
    found: dict = {}
    items.append(_check("data", lambda: _found(found, _splits(config, cache_dir))))
    data_ok = all(multihost.allgather_json(items[-1].ok))  # the same branch on every host
    if data_ok:
        items.append(_check("labels", lambda: _labels(config, found["sources"]["train"])))
        items.append(_check("step", lambda: _step(config, found["sources"]["train"].num_classes)))
        items.append(_check("records", lambda: _one_record(found["sources"]["train"])))
    else:
        items += [Item(n, False, "not checked: the data was not found") for n in ("labels", "step", "records")]
    items.append(_workdir(workdir))
    reports = multihost.allgather_json([dataclasses.asdict(i) for i in items])
    if jax.process_index() == 0:
        print(format_report(reports), flush=True)
    return all(i["ok"] for report in reports for i in report) and _same_versions(reports)


def _found(into: dict, result: tuple[str, dict]) -> str:
    into["sources"] = result[1]
    return result[0]


def _same_versions(reports: list[list[dict]]) -> bool:
    return all(len({r[k]["detail"] for r in reports}) == 1 for k in (0, 1))


def _processes(ids: list[int], count: int) -> str:
    if len(ids) == count:
        return "all" if count > 1 else "-"
    return ",".join(map(str, ids)) if len(ids) <= 6 else f"{ids[0]}..{ids[-1]} ({len(ids)})"


def format_report(reports: list[list[dict]]) -> str:
    """One table: a row per check and distinct outcome, with the processes that share it."""
    count = len(reports)
    lines = [f"preflight: {count} process{'es' if count > 1 else ''}",
             f"  {'check':9s} {'processes':10s} {'':5s} detail"]
    problems = 0
    for k, first in enumerate(reports[0]):
        outcomes: dict[tuple[bool, str], list[int]] = {}
        for p, report in enumerate(reports):
            outcomes.setdefault((report[k]["ok"], report[k]["detail"]), []).append(p)
        varies = first["name"] in ("python", "jax") and len(outcomes) > 1
        if not varies and all(ok for ok, _ in outcomes):  # passed everywhere: process 0's words for all
            outcomes = {(True, first["detail"]): list(range(count))}
        for (ok, detail), ids in sorted(outcomes.items(), key=lambda o: (o[0][0], o[1][0])):
            bad = not ok or varies
            problems += bad
            note = " (differs between hosts)" if varies and ok else ""
            lines.append(f"  {first['name']:9s} {_processes(ids, count):10s} {'FAIL' if bad else 'ok':5s} "
                         f"{detail}{note}")
    lines.append("preflight: all checks passed" if not problems else
                 f"preflight: {problems} problem{'s' if problems > 1 else ''}; nothing was trained "
                 f"(exit status {FAILED_EXIT_CODE})")
    return "\n".join(lines)
