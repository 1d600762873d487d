"""What SemPPL adds to a step, in XLA's own accounting (compiled, not run).

Compiles, on the first local device, (a) the SemPPL update step and (b) a bare
step of the same views: the online forward/backward of every view plus the
target forward of the large views, with the same LARS update and target EMA,
and none of the augmentation, queue, k-NN, semantic positives or loss terms
(a cosine loss stands in). Prints bytes accessed, FLOPs and temporaries of
both and their ratio; also times ``queue.sample_positives`` and the k-NN at
paper scale (C = 204,800 entries, 64 images, M = 3) and the push that keeps the
queue's label order (``--queue_only``: those timings alone).

    python benchmarks/step_bytes.py                       # ResNet-50, 16 images, 4x224 + 2x96, C = 20,480
    python benchmarks/step_bytes.py --depth=small --size=32 --small_size=16 --per_device=64

On CPU the analyses upcast bf16 to f32: read the ratios, not the device figures.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from synthetic_batch import random_batch
from timing import seconds_per_call

from experiments import imagenet
from semppl_jax import losses, optim, sharding, update_step
from semppl_jax import queue as pl_queue


def make_config(args):
    c = imagenet.get_config("resnet50,1pct")
    c.model.depth = args.depth
    c.views.update(dict(large_size=args.size, small_size=args.small_size, num_large=args.large,
                        num_small=args.small))
    c.training.batch_size = args.per_device
    c.training.compute_dtype = args.dtype
    c.semppl.queue_size = args.queue
    c.augment.blur_impl = args.blur_impl
    c.semppl.gate_samples = args.gate_samples
    return c


def bare_update(config, num_classes: int, total_steps: int):
    """Online fwd/bwd of all views + target fwd of the large views + LARS + EMA: the
    least any BYOL/ReLIC-style step of these views must do."""
    net = update_step.make_network(config, num_classes)
    lr, tau = update_step.make_schedules(config, total_steps, 10)
    opt = optim.make_optimizer(config.optim, lr)
    nl, ns = config.views.num_large, config.views.num_small

    def step(state, batch):
        large = update_step._views_first(batch["large"], False).astype(jnp.float32) / 255.0
        small = update_step._views_first(batch["small"], False).astype(jnp.float32) / 255.0
        b = large.shape[1]
        t, target_state = net.apply(state.target_params, state.target_state, None,
                                    large.reshape((-1,) + large.shape[2:]), True, ("projection",))
        t = jax.lax.stop_gradient(losses.l2_normalize(t["projection"]).reshape(nl, b, -1))

        def loss_fn(p):
            o, s = net.apply(p, state.online_state, None, large.reshape((-1,) + large.shape[2:]), True,
                             ("prediction",))
            preds = [o["prediction"].reshape(nl, b, -1)]
            if ns:
                o2, _ = net.apply(p, s, None, small.reshape((-1,) + small.shape[2:]), True, ("prediction",))
                preds.append(o2["prediction"].reshape(ns, b, -1))
            return -jnp.mean(jnp.einsum("ubd,vbd->", losses.l2_normalize(jnp.concatenate(preds)), t)), s

        grads, net_state = jax.grad(loss_fn, has_aux=True)(state.online_params)
        grads = jax.lax.pmean(grads, sharding.AXIS)
        updates, opt_state = opt.update(grads, state.opt_state, state.online_params)
        online = jax.tree.map(lambda p, u: p + u, state.online_params, updates)
        target = optim.ema_update(state.target_params, online, tau(state.step))
        return state._replace(online_params=online, online_state=net_state, target_params=target,
                              target_state=target_state, opt_state=opt_state, step=state.step + 1), {}

    return step


def analyse(fn, state, batch) -> dict:
    compiled = fn.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    return dict(bytes_accessed=float(cost.get("bytes accessed", 0.0)), flops=float(cost.get("flops", 0.0)),
                temp_bytes=int(mem.temp_size_in_bytes) if mem is not None else None)


def _ms(fn, *args, iters: int) -> float:
    return 1e3 * seconds_per_call(fn, *args, iters=iters)


def queue_timing(size=204_800, n=64, m=3, dim=256, classes=1000, views=4, block=16_384, labelled=0.1,
                 iters=20) -> dict:
    """Milliseconds for sampling (with the label order ``push`` maintains, and sorting
    afresh as a queue without it must), the k-NN, and pushing one global block
    (``block`` rows, a ``labelled`` fraction valid: 4,096 images x 4 views at 10%)."""
    key = jax.random.key(0)
    q = pl_queue.indexed(pl_queue.QueueState(
        embeddings=losses.l2_normalize(jax.random.normal(key, (size, dim))),
        labels=jax.random.randint(key, (size,), 0, classes),
        ids=jax.random.randint(jax.random.key(1), (size,), 0, 128_000), pointer=jnp.zeros((), jnp.int32)))
    labels = jax.random.randint(jax.random.key(2), (n,), 0, classes)
    sample = jax.jit(lambda q, y: pl_queue.sample_positives(jax.random.key(3), q, y, jnp.arange(n), jnp.arange(n), m))
    queries = losses.l2_normalize(jax.random.normal(jax.random.key(4), (views, n, dim)))
    knn1 = jax.jit(lambda q, x: pl_queue.pseudo_labels(q, x, 1, classes))
    rows = (losses.l2_normalize(jax.random.normal(key, (block, dim))),
            jax.random.randint(jax.random.key(5), (block,), 0, classes), jnp.arange(block),
            jax.random.uniform(jax.random.key(6), (block,)) < labelled)
    push = jax.jit(pl_queue.push)
    return dict(sample_positives_ms=_ms(sample, q, labels, iters=iters),
                sample_positives_sorting_ms=_ms(sample, q._replace(by_label=None), labels, iters=iters),
                knn_k1_ms=_ms(knn1, q, queries, iters=iters),
                push_merge_ms=_ms(push, q, *rows, iters=iters),
                push_without_order_ms=_ms(push, q._replace(by_label=None), *rows, iters=iters))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--depth", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--small_size", type=int, default=96)
    p.add_argument("--large", type=int, default=4)
    p.add_argument("--small", type=int, default=2)
    p.add_argument("--per_device", type=int, default=16)
    p.add_argument("--queue", type=int, default=20_480)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--blur_impl", default="conv", help="augment.blur_impl")
    p.add_argument("--gate_samples", type=int, default=512,
                   help="semppl.gate_samples; on this one device all of them (a pod spreads them over its replicas)")
    p.add_argument("--skip_queue_timing", action="store_true", help="XLA's accounting only")
    p.add_argument("--out", default="step_bytes.json")
    p.add_argument("--queue_only", action="store_true", help="only the queue timings (seconds, not minutes)")
    args = p.parse_args()
    if args.queue_only:
        print(json.dumps(queue_timing(), indent=2))
        return
    config = make_config(args)
    mesh = sharding.make_mesh(jax.local_devices()[:1])
    state = sharding.replicate(jax.device_get(update_step.init_state(config, jax.random.key(0), 1000, 100, 10)),
                                  mesh)
    batch = sharding.shard_batch(random_batch(config), mesh)
    semppl = sharding.shard_step(update_step.make_update_step(config, 1000, 100, 10), mesh)
    bare = jax.jit(jax.shard_map(bare_update(config, 1000, 100), mesh=mesh, in_specs=(P(), P("data")),
                                 out_specs=(P(), P()), check_vma=False))
    rows = dict(semppl=analyse(semppl, state, batch), bare=analyse(bare, state, batch))
    rows["ratio_bytes"] = rows["semppl"]["bytes_accessed"] / rows["bare"]["bytes_accessed"]
    rows["ratio_flops"] = rows["semppl"]["flops"] / rows["bare"]["flops"]
    rows["setting"] = vars(args)
    rows["device"] = str(jax.local_devices()[0].device_kind)
    print(f"SemPPL step / bare step: bytes accessed x{rows['ratio_bytes']:.4f}, FLOPs x{rows['ratio_flops']:.4f}")
    if not args.skip_queue_timing:
        rows["queue"] = queue_timing()
        q = rows["queue"]
        print(f"sample_positives (C=204,800, 64 images, M=3) {q['sample_positives_ms']:.2f} ms "
              f"(sorting afresh: {q['sample_positives_sorting_ms']:.2f} ms); pushing 16,384 rows "
              f"{q['push_merge_ms']:.2f} ms with the label order kept sorted, "
              f"{q['push_without_order_ms']:.2f} ms without; k-NN k=1 {q['knn_k1_ms']:.2f} ms")
    print(json.dumps(rows, indent=2))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
