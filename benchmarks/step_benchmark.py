"""What SemPPL's own parts cost: step time of the SemPPL step, the alpha = 0 step and
the bare online + target forward/backward of the same views; and k-NN + sampling
alone for queue sizes 1k to 128k.

    python benchmarks/step_benchmark.py [--iters 5] [--out step_benchmark.json]

Runs on whatever JAX sees (here: the host CPU, one device). Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from synthetic_batch import random_batch
from timing import seconds_per_call

from experiments import tiny
from semppl_jax import losses, sharding, update_step
from semppl_jax import queue as pl_queue


def bare_step(config, num_classes):
    """Online + target forward/backward of the same views; no queue, k-NN or sampling."""
    net = update_step.make_network(config, num_classes)
    nl, ns = config.views.num_large, config.views.num_small

    def step(state, batch):
        large = jnp.swapaxes(batch["large"], 0, 1).astype(jnp.float32) / 255.0
        small = jnp.swapaxes(batch["small"], 0, 1).astype(jnp.float32) / 255.0
        b = large.shape[1]
        t, _ = net.apply(state.target_params, state.target_state, None, large.reshape((-1,) + large.shape[2:]),
                         True, ("projection",))
        t = jax.lax.stop_gradient(losses.l2_normalize(t["projection"]).reshape(nl, b, -1))

        def loss_fn(p):
            o, s = net.apply(p, state.online_state, None, large.reshape((-1,) + large.shape[2:]), True)
            preds = [o["prediction"].reshape(nl, b, -1)]
            if ns:
                o2, _ = net.apply(p, s, None, small.reshape((-1,) + small.shape[2:]), True, ("prediction",))
                preds.append(o2["prediction"].reshape(ns, b, -1))
            return -jnp.mean(jnp.einsum("ubd,vbd->", losses.l2_normalize(jnp.concatenate(preds)), t))

        grads = jax.lax.pmean(jax.grad(loss_fn)(state.online_params), sharding.AXIS)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, state.online_params, grads)

    return step


def step_times(name, config, iters) -> list[dict]:
    mesh = sharding.make_mesh(jax.devices()[:1])
    batch = sharding.shard_batch(random_batch(config, 10), mesh)
    init = jax.device_get(update_step.init_state(config, jax.random.key(0), 10, 100, 10))
    rows = []
    for label, alpha in (("SemPPL step", config.semppl.alpha), ("alpha = 0 step", 0.0)):
        config.semppl.alpha = alpha
        fn = sharding.shard_step(update_step.make_update_step(config, 10, 100, 10), mesh)
        holder = {"s": sharding.replicate(init, mesh)}  # the state is donated: feed each output back

        def loop(b, fn=fn):
            holder["s"], m = fn(holder["s"], b)
            return m

        secs = seconds_per_call(loop, batch, iters=iters)
        rows.append(dict(setting=name, what=label, sec_per_step=secs,
                         images_per_sec=config.training.batch_size / secs))
    from jax.sharding import PartitionSpec as P

    bare = jax.jit(jax.shard_map(bare_step(config, 10), mesh=mesh, in_specs=(P(), P("data")), out_specs=P(),
                                 check_vma=False))
    state = sharding.replicate(init, mesh)
    secs = seconds_per_call(bare, state, batch, iters=iters)
    rows.append(dict(setting=name, what="bare online+target fwd/bwd", sec_per_step=secs,
                     images_per_sec=config.training.batch_size / secs))
    return rows


def knn_costs(iters, per_replica_batch=256, views=4, dim=256, classes=1000, m=3) -> list[dict]:
    rows = []
    key = jax.random.key(0)
    for size in (1024, 4096, 16384, 65536, 131072):
        q = pl_queue.indexed(pl_queue.QueueState(  # with the label order push maintains
            embeddings=losses.l2_normalize(jax.random.normal(key, (size, dim))),
            labels=jax.random.randint(key, (size,), 0, classes), ids=jnp.arange(size),
            pointer=jnp.zeros((), jnp.int32)))
        queries = losses.l2_normalize(jax.random.normal(jax.random.key(1), (views, per_replica_batch, dim)))

        @jax.jit
        def f(q, queries):
            labels = pl_queue.pseudo_labels(q, queries, 1, classes)
            return pl_queue.sample_positives(jax.random.key(2), q, labels, jnp.arange(per_replica_batch) + size,
                                             jnp.arange(per_replica_batch), m)

        rows.append(dict(queue_size=size, sec=seconds_per_call(f, q, queries, iters=iters)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="step_benchmark.json")
    args = parser.parse_args()
    rows = []
    cfg = tiny.get_config()
    rows += step_times("tiny, 32px, batch 32 (2x32 + 2x16 views)", cfg, args.iters)
    cfg = tiny.get_config()
    cfg.model.update(depth="resnet18", projector_hidden_size=512, predictor_hidden_size=512, projection_size=128)
    cfg.training.batch_size = 64
    cfg.semppl.queue_size = 1024
    rows += step_times("ResNet-18, 32px, batch 64 (2x32 + 2x16 views)", cfg, args.iters)
    knn = knn_costs(args.iters)
    print(f"device: {jax.devices()[0].device_kind} x1")
    print(f"{'setting':48s} {'step':28s} {'s/step':>8s} {'img/s':>8s}")
    for r in rows:
        print(f"{r['setting']:48s} {r['what']:28s} {r['sec_per_step']:8.3f} {r['images_per_sec']:8.1f}")
    for setting in dict.fromkeys(r["setting"] for r in rows):
        t = {r["what"]: r["sec_per_step"] for r in rows if r["setting"] == setting}
        extra = t["SemPPL step"] - t["bare online+target fwd/bwd"]
        print(f"  {setting}: SemPPL-specific share of the step = {100 * extra / t['SemPPL step']:.1f}% "
              f"(SemPPL vs alpha=0: {100 * (t['SemPPL step'] - t['alpha = 0 step']) / t['SemPPL step']:+.1f}%)")
    print("k-NN (k=1, 4 views x 256 queries, D=256, 1000 classes) + sampling M=3, per replica:")
    for r in knn:
        print(f"  queue {r['queue_size']:7d}: {1e3 * r['sec']:8.2f} ms")
    with open(args.out, "w") as f:
        json.dump(dict(steps=rows, knn=knn, device=str(jax.devices()[0])), f, indent=2)


if __name__ == "__main__":
    main()
