"""``device_check.py --profile``: where the SemPPL step's device time goes, in phases.

1. the SemPPL step at ``--fixed`` images a device: time, samples/s, MFU, and a trace of
   ``--trace_steps`` steps reduced to categories (``trace_breakdown.breakdown``);
2. the bare forward/backward step of the same views (``step_bytes.bare_update``: the
   least a BYOL-style step must do), and that step with every BatchNorm made the
   identity (what BatchNorm costs);
3. the augmentation alone: each blur (``augment.BLURS``) and none;
4. the SemPPL step with the other blur;
5. on GPU, the SemPPL step with XLA's command buffers off (a fresh process).

The JSON at ``--out`` is rewritten after every phase. Compiled programs go to a
persistent cache (``--cache_dir``), so variants and reruns reuse compilation and
autotuning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock

import haiku as hk
import jax
from jax.sharding import PartitionSpec as P


def _without_batchnorm(step):
    """``step`` traced with every ``hk.BatchNorm`` returning its input unchanged."""
    def identity_bn(next_fn, args, kwargs, context):
        if isinstance(context.module, hk.BatchNorm) and context.method_name == "__call__":
            return args[0]
        return next_fn(*args, **kwargs)

    def wrapped(state, batch):
        with hk.intercept_methods(identity_bn):
            return step(state, batch)

    return wrapped


def _augment_seconds(config, batch, impl: str | None, iters: int) -> float:
    """The augmentation of every view alone; ``impl`` None: no blur at all."""
    from timing import seconds_per_call

    from semppl_jax import augment, update_step

    cfg = config.augment.copy_and_resolve_references()
    cfg.blur_impl = impl or "none"
    nl = config.views.num_large

    @jax.jit
    def run(key, large, small):
        idx = jax.numpy.arange(large.shape[0])
        out = augment.augment_views(key, update_step._views_first(large, False), 0, idx, cfg)
        if small.shape[1]:
            out = (out, augment.augment_views(key, update_step._views_first(small, False), nl, idx, cfg))
        return out

    with mock.patch.dict(augment.BLURS, none=lambda key, x, *a, **k: x):  # "none": the image as it is
        return seconds_per_call(run, jax.random.key(0), jax.device_put(batch["large"]),
                                jax.device_put(batch["small"]), iters=iters)


class _Recorder:
    """The report, written after every phase (a run cut short keeps what it measured)."""

    def __init__(self, args, per_device: int, peak, per_sample: float, report: dict):
        self.args, self.b, self.peak, self.per_sample, self.report = args, per_device, peak, per_sample, report
        self.t0 = time.time()

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.time() - self.t0, 1)
        with open(self.args.out, "w") as f:
            json.dump(self.report, f, indent=2)

    def __call__(self, name: str, **fields) -> None:
        if "step_s" in fields:
            fields["samples_per_s"] = self.b / fields["step_s"]
            fields["mfu"] = None if self.peak is None else self.per_sample * self.b / fields["step_s"] / self.peak
        self.report["phases"][name] = fields
        self.save()
        print(json.dumps({name: {k: v for k, v in fields.items() if k != "breakdown"}}), flush=True)


def _semppl_phase(config, mesh, args, record):
    """1. The SemPPL step, traced, then timed (the step donates its state: each call takes
    the state the previous one returned). Returns the device batch it ran on."""
    import device_check as dc
    import trace_breakdown as tb

    compiled, state, batch, _, _, secs = dc.compile_step(config, mesh)
    with tempfile.TemporaryDirectory() as trace_dir:
        state = tb.trace_steps(compiled, state, batch, args.trace_steps, trace_dir)
        breakdown = tb.breakdown(compiled.as_text(), trace_dir, args.trace_steps, module="update_step")
    record("semppl", step_s=dc.time_steps(compiled, state, batch, 3, args.iters), compile_s=round(secs, 1),
           breakdown=breakdown)
    print(tb.table(breakdown), flush=True)
    return batch


def _bare_phases(config, mesh, batch, args, record) -> None:
    """2. The bare forward/backward step, with and without BatchNorm."""
    import device_check as dc
    from step_bytes import bare_update

    from semppl_jax import sharding, update_step

    for name, wrap in (("bare", lambda f: f), ("bare_without_batchnorm", _without_batchnorm)):
        fn = jax.jit(jax.shard_map(wrap(bare_update(config, 1000, 10_000)), mesh=mesh, in_specs=(P(), P("data")),
                                   out_specs=(P(), P()), check_vma=False), donate_argnums=0)
        state = sharding.replicate(update_step.init_state(config, jax.random.key(0), 1000, 10_000, 300), mesh)
        t = time.time()
        compiled = fn.lower(state, batch).compile()
        record(name, step_s=dc.time_steps(compiled, state, batch, 3, args.iters), compile_s=round(time.time() - t, 1))
        del compiled, state


def _blur_phases(config, mesh, args, b: int, record) -> None:
    """3. The augmentation alone, with each blur and none; 4. the step with the other blur(s)."""
    import device_check as dc
    from synthetic_batch import random_batch

    from semppl_jax import augment

    host_batch = random_batch(config)
    record("augmentation", **{f"{impl}_s": _augment_seconds(config, host_batch, impl, args.iters)
                              for impl in augment.BLURS},
           no_blur_s=_augment_seconds(config, host_batch, None, args.iters))
    for impl in (i for i in augment.BLURS if i != args.blur_impl):
        other = dc.make_config(args, b)
        other.augment.blur_impl = impl
        compiled, state, batch, _, _, secs = dc.compile_step(other, mesh)
        record(f"semppl_blur_{impl}", step_s=dc.time_steps(compiled, state, batch, 3, args.iters),
               compile_s=round(secs, 1))
        del compiled, state


def _command_buffers_phase(args, b: int, record) -> None:
    """5. Command buffers off (GPU): a fresh process, since XLA reads its flags once."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cb.json")
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
        env = dict(os.environ, XLA_FLAGS=flags.strip())
        cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "device_check.py"), f"--fixed={b}",
               f"--size={args.size}", f"--small_size={args.small_size}", f"--dtype={args.dtype}",
               f"--iters={args.iters}", f"--blur_impl={args.blur_impl}", f"--out={out}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            with open(out) as f:
                record("semppl_command_buffers_off", step_s=json.load(f)["step_s"])
        else:
            record("semppl_command_buffers_off", error=done.stderr[-500:])


def run(args) -> dict:
    import device_check as dc

    from semppl_jax import sharding

    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    device = jax.local_devices()[0]
    mesh = sharding.make_mesh([device])
    b = args.fixed or 256
    config = dc.make_config(args, b)
    per_sample = dc.model_flops_per_sample(config)
    views = f"{config.views.num_large}x{args.size} + {config.views.num_small}x{args.small_size}"
    report = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__, dtype=args.dtype,
                  per_device=b, views=views, blur_impl=args.blur_impl, model_gflops_per_sample=per_sample / 1e9,
                  phases={})
    record = _Recorder(args, b, dc.peak_flops(device.device_kind), per_sample, report)
    batch = _semppl_phase(config, mesh, args, record)
    _bare_phases(config, mesh, batch, args, record)
    report["semppl_over_bare"] = report["phases"]["semppl"]["step_s"] / report["phases"]["bare"]["step_s"]
    _blur_phases(config, mesh, args, b, record)
    if device.platform == "gpu":
        _command_buffers_phase(args, b, record)
    report["total_s"] = round(time.time() - record.t0, 1)
    record.save()
    return report


