"""Device check: ResNet-50 SemPPL on one accelerator, bf16: the largest per-device batch
that fits, step time, samples/s and MFU, as JSON. Sized to finish in < 8 minutes on one H100.

    python benchmarks/device_check.py --out=device_check.json
    python benchmarks/device_check.py --depth=tiny --size=32 --small_size=16 --candidates=8,16   # CPU smoke test
    python benchmarks/device_check.py --profile --fixed=256 --out=$OUT/profile.json   # where the time goes

Needs JAX, Haiku, optax and ml-collections only (no TensorFlow): batches are
random uint8 views made on the host once, so the figures are the update step's
(augmentation, both networks, queue, k-NN, losses, LARS, EMA), not the input
pipeline's. The fit search compiles at two batch sizes, extrapolates XLA's
per-device memory analysis linearly, then compiles and runs the predicted
largest batch (and the next smaller candidate if that fails). MFU = the model's
training FLOPs per sample (``model_flops_per_sample``: XLA's GPU cost analysis
leaves out library convolutions, so its step count is reported but not used) x
samples/s / the chip's peak dense bf16 rate.

``--profile`` (``profile_step.py``) times the step at ``--fixed`` images a device, traces a
few steps and reduces the trace to device time per category
(``trace_breakdown.py``), then times the bare forward/backward step, that step
without BatchNorm, the augmentation alone (each blur, and none), the step with the
banded-matmul blur and, on GPU, the step with XLA's command buffers off. The JSON
is rewritten after every phase, so a run cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from synthetic_batch import random_batch  # noqa: E402

from experiments import imagenet  # noqa: E402
from semppl_jax import memory, sharding, update_step  # noqa: E402

# Dense bf16 peak FLOP/s per chip (vendor figures).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
             "TPU v5p": 459e12}


def peak_flops(kind: str) -> float | None:
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


def make_config(args, per_device: int):
    c = imagenet.get_config(f"{args.arch},{args.subset}")
    c.model.depth = args.depth or c.model.depth
    c.model.remat = args.remat
    c.views.update(dict(large_size=args.size, small_size=args.small_size))
    c.training.batch_size = per_device
    c.training.compute_dtype = args.dtype
    c.augment.blur_impl = args.blur_impl
    return c


def compile_step(config, mesh):
    """(compiled step, state, batch, memory usage, FLOPs) for ``config`` on one device."""
    state = sharding.replicate(update_step.init_state(config, jax.random.key(0), 1000, 10_000, 300), mesh)
    batch = sharding.shard_batch(random_batch(config), mesh)
    fn = sharding.shard_step(update_step.make_update_step(config, 1000, 10_000, 300), mesh)
    t = time.time()
    compiled = fn.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled, state, batch, memory.step_bytes(compiled), float(cost.get("flops", 0.0)), time.time() - t


def model_flops_per_sample(config) -> float:
    """Training FLOPs per sample counted from the network itself, not from XLA's GPU cost
    analysis (which leaves out convolutions run as library calls): the forward FLOPs of
    one image at each view size, from XLA's CPU cost analysis of the encoder + heads,
    times 3 for the online forward + backward of every view, plus one forward of each
    large view through the target network."""
    net = update_step.make_network(config, 1000, axis_name=None)
    cpu = jax.devices("cpu")[0]

    def fwd_flops(size: int) -> float:
        x = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
        params, state = jax.eval_shape(lambda: net.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32),
                                                        True))
        f = jax.jit(lambda p, s, x: net.apply(p, s, None, x, False, ("prediction",))[0]["prediction"])
        with jax.default_device(cpu):
            cost = f.lower(params, state, x).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])

    v = config.views
    large, small = fwd_flops(v.large_size), fwd_flops(v.small_size) if v.num_small else 0.0
    return 3 * (v.num_large * large + v.num_small * small) + v.num_large * large


def time_steps(compiled, state, batch, warmup: int, iters: int) -> float:
    """Seconds a call of a compiled ``(state, batch) -> (state, aux)`` step, each call taking
    the state the last one returned (the step donates it)."""
    for _ in range(warmup):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(iters):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    return (time.perf_counter() - t) / iters


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--subset", default="1pct")
    p.add_argument("--depth", default=None, help="override model.depth (e.g. tiny for a smoke test)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--small_size", type=int, default=96)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="none")
    p.add_argument("--candidates", default="64,96,128,192,256,384,512")
    p.add_argument("--probe", default="32,64", help="two batch sizes compiled to extrapolate memory")
    p.add_argument("--fixed", type=int, default=None, help="skip the fit search: time this per-device batch")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="device_check.json")
    p.add_argument("--profile", action="store_true", help="where the time goes (profile_step.py), at --fixed images")
    p.add_argument("--trace_steps", type=int, default=5)
    p.add_argument("--blur_impl", default="conv", help="augment.blur_impl")
    p.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/semppl_xla"),
                   help="persistent compilation cache (--profile)")
    return p.parse_args()


def _fitting(args, mesh, limit, report: dict) -> list[int]:
    """1. Memory per image from two compiles (bytes grow linearly with the batch): the
    candidate batches predicted to fit, largest last."""
    candidates = sorted(int(x) for x in args.candidates.split(","))
    probes = [] if args.fixed else [int(x) for x in args.probe.split(",")]
    peaks = []
    for b in probes:
        _, _, _, usage, flops, secs = compile_step(make_config(args, b), mesh)
        peaks.append(usage["peak"] if usage else None)
        report["probes"].append(dict(per_device=b, peak_gib=None if usage is None else usage["peak"] / memory.GIB,
                                     compile_s=round(secs, 1)))
        print(json.dumps(report["probes"][-1]), flush=True)
    if args.fixed:
        return [args.fixed]
    if limit is not None and None not in peaks:
        per_image = (peaks[1] - peaks[0]) / (probes[1] - probes[0])
        fixed = peaks[0] - per_image * probes[0]
        report["per_image_gib"], report["fixed_gib"] = per_image / memory.GIB, fixed / memory.GIB
        return [b for b in candidates if fixed + per_image * b <= 0.95 * limit] or candidates[:1]
    return candidates[:1]  # no memory figures (e.g. CPU): just the smallest candidate


def _time_largest(args, mesh, device, fitting: list[int], report: dict) -> None:
    """2. Compile and run the largest predicted fit; step down on failure."""
    for b in reversed(fitting):
        try:
            compiled, state, batch, usage, flops, secs = compile_step(make_config(args, b), mesh)
            step_s = time_steps(compiled, state, batch, 3, args.iters)
        except Exception as e:  # noqa: BLE001 - an OOM here means "does not fit": try smaller
            report.setdefault("failed", []).append(dict(per_device=b, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(json.dumps(report["failed"][-1]), flush=True)
            continue
        peak = peak_flops(device.device_kind)
        per_sample = model_flops_per_sample(make_config(args, b))
        achieved = per_sample * b / step_s
        report.update(largest_fitting_per_device=b, compile_s=round(secs, 1), step_s=step_s,
                      samples_per_s=b / step_s, model_gflops_per_sample=per_sample / 1e9,
                      xla_step_flops=flops, achieved_tflops=achieved / 1e12,
                      peak_tflops=None if peak is None else peak / 1e12,
                      mfu=None if peak is None else achieved / peak,
                      peak_gib=None if usage is None else usage["peak"] / memory.GIB)
        return


def main() -> None:
    args = _arguments()
    if args.profile:
        import profile_step

        profile_step.run(args)
        return
    t_start = time.time()
    device = jax.local_devices()[0]
    mesh = sharding.make_mesh([device])
    limit = memory.device_limit(device)
    report = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__, dtype=args.dtype,
                  remat=args.remat, arch=args.arch, views=f"4x{args.size} + 2x{args.small_size}",
                  memory_limit_gib=None if limit is None else limit / memory.GIB, probes=[])
    _time_largest(args, mesh, device, _fitting(args, mesh, limit, report), report)
    report["total_s"] = round(time.time() - t_start, 1)
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
