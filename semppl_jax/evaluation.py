"""The three evaluation protocols: fine-tune (the paper's headline), linear, k-NN.

All start from pretrained encoder weights, ours (a workdir's checkpoint) or a
released-format ``pretrain.pkl``, or from scratch (the supervised baseline).
Training steps are per replica and sharded like the pretraining step; test
metrics are psum-ed counts over padded, masked batches, so every test example
counts exactly once whatever the device and process layout.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from semppl_jax import augment, datasets, input_pipeline, multihost, networks, sharding, sources
from semppl_jax.errors import CheckpointError
from semppl_jax.sharding import AXIS

HEAD = "eval_head"


class ClassifierState(NamedTuple):
    params: hk.Params
    net_state: hk.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


def make_classifier(model_cfg: Any, num_classes: int, axis_name: str | None,
                    compute_dtype: str = "float32") -> hk.TransformedWithState:
    """Encoder (same module names as pretraining) + a new linear head."""
    bn = dict(networks.BN_DEFAULTS, decay_rate=model_cfg.bn_decay, cross_replica_axis=axis_name)

    def forward(images: jax.Array, is_training: bool, frozen: bool = False):
        networks.set_compute_dtype(compute_dtype)
        encoder = networks.encoder_from_config(model_cfg, bn)
        emb = encoder(images, is_training and not frozen)
        if frozen:
            emb = jax.lax.stop_gradient(emb)
        return emb, hk.Linear(num_classes, name=HEAD)(emb)

    return hk.transform_with_state(forward)


class Pretrained(NamedTuple):
    params: dict  # online encoder (+ heads) parameters, host numpy
    state: dict
    step: int
    source: str  # the checkpoint directory or pickle it came from


def load_pretrained(checkpoint: str, config: Any) -> Pretrained:
    """The online network from our workdir (Orbax, a partial restore of the online
    parameters and state alone) or from a released-format ``pretrain.pkl``.

    ``checkpointing.resolve`` decides once, on process 0, what to read: a workdir's newest
    step, or its ``pretrain.pkl`` when that is at least as new (a stale export never
    shadows a newer checkpoint; a damaged one is skipped, naming it). Then one read.
    """
    from semppl_jax import checkpointing, export

    def read(resolved: checkpointing.Resolved) -> Pretrained:
        if resolved.kind == "pickle":  # every process reads it; all must read the same step
            params, state, step = multihost.agreed(
                lambda: resolved.loaded or export.load_pretrain_pkl(resolved.location), f"reading {resolved.location}")
            steps = multihost.allgather_json(step)
            if len(set(steps)) > 1:
                raise CheckpointError(f"{resolved.location} holds step {steps[0]} for process 0 and {steps} across "
                                      f"processes: was it replaced while being read? Evaluate again")
            return Pretrained(params, state, step, resolved.location)
        params, state, step = checkpointing.restore_encoder(checkpoint, config, step=resolved.step, newest=True)
        return Pretrained(params, state, step, resolved.location)

    return checkpointing.read_newest(checkpoint, read)


def transplant(params: dict, state: dict, pre_params: dict, pre_state: dict) -> tuple[dict, dict]:
    """Copies every encoder module of the pretrained trees into ours; all must be there."""
    params, state = dict(params), dict(state)
    for tree, pre, what in ((params, pre_params, "parameter"), (state, pre_state, "state")):
        for module in list(tree):
            if module.startswith(HEAD):
                continue
            if module not in pre:
                raise ValueError(f"pretrained {what}s lack module {module!r}: a different architecture? "
                                 f"(it has e.g. {sorted(pre)[:3]})")
            for name, value in tree[module].items():
                got = np.asarray(pre[module][name])
                if got.shape != value.shape:
                    raise ValueError(f"pretrained {module}/{name} has shape {got.shape}, expected {value.shape}")
            tree[module] = {n: jnp.asarray(pre[module][n], tree[module][n].dtype) for n in tree[module]}
    return params, state


def frozen_encoder(config: Any, num_classes: int, pretrained: Pretrained, mesh
                   ) -> tuple[hk.TransformedWithState, dict, dict]:
    """The classifier network holding ``pretrained``'s encoder, replicated on ``mesh``: what
    the k-NN and the pseudo-labels embed with (the head stays as initialised, unused)."""
    net = make_classifier(config.model, num_classes, None)
    size = config.views.eval_size
    params, net_state = net.init(jax.random.key(0), jnp.zeros((2, size, size, 3)), True)
    params, net_state = sharding.replicate(transplant(params, net_state, pretrained.params, pretrained.state), mesh)
    return net, params, net_state


def _flip_and_normalize(key: jax.Array, images: jax.Array, global_index: jax.Array, flip: bool) -> jax.Array:
    x = images.astype(jnp.float32) / 255.0
    if flip:
        do = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)) < 0.5)(global_index)
        x = jnp.where(do[:, None, None, None], x[:, :, ::-1], x)
    return augment.normalize(x)


def make_train_step(net: hk.TransformedWithState, optimizer: optax.GradientTransformation, frozen: bool,
                    flip: bool):
    def step(state: ClassifierState, batch: dict) -> tuple[ClassifierState, dict]:
        b = batch["label"].shape[0]
        global_index = jax.lax.axis_index(AXIS) * b + jnp.arange(b)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        x = _flip_and_normalize(key, batch["image"], global_index, flip)

        def loss_fn(p):
            (_, logits), net_state = net.apply(p, state.net_state, None, x, True, frozen)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(batch["label"], 0))
            mask = (batch["label"] >= 0).astype(jnp.float32)
            share, mean = sharding.global_mean(jnp.sum(ce * mask), jnp.sum(mask))
            return share, (net_state, mean)

        grads, (net_state, loss) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ClassifierState(params, net_state, opt_state, state.step + 1, state.rng), {"loss": loss}

    return step


def make_eval_step(net: hk.TransformedWithState):
    def step(params, net_state, batch):
        x = augment.preprocess_eval(batch["image"])
        (emb, logits), _ = net.apply(params, net_state, None, x, False)
        mask = batch["mask"]
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        hit1 = (top5[:, 0] == batch["label"]) & mask
        hit5 = jnp.any(top5 == batch["label"][:, None], axis=-1) & mask
        sums = dict(top1=jnp.sum(hit1), top5=jnp.sum(hit5), count=jnp.sum(mask))
        return jax.tree.map(lambda v: jax.lax.psum(v.astype(jnp.int32), AXIS), sums)

    return step


def make_embed_step(net: hk.TransformedWithState, key: str = "label"):
    def step(params, net_state, batch):
        (emb, _), _ = net.apply(params, net_state, None, augment.preprocess_eval(batch["image"]), False)
        return emb, batch[key], batch["mask"]

    return step


def _sharded(fn, mesh, in_specs, out_specs, donate=()):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False),
                   donate_argnums=donate)


def eval_batches(source: sources.Source, config: Any, max_examples: int | None = None,
                 ids: np.ndarray | None = None, keep_crops: bool = False) -> tf.data.Dataset:
    """This process's centre-crop batches of ``source`` (``input_pipeline.eval_dataset``)."""
    local_batch = config.eval.batch_size // jax.process_count()
    return input_pipeline.eval_dataset(source, config, local_batch, jax.process_index(), jax.process_count(),
                                       max_examples, ids, keep_crops)


def _eval_batches(source: sources.Source, config: Any, mesh, max_examples: int | None = None,
                  ids: np.ndarray | None = None, batches: tf.data.Dataset | None = None) -> Iterator[dict]:
    ds = eval_batches(source, config, max_examples, ids) if batches is None else batches
    for batch in ds.as_numpy_iterator():
        yield sharding.shard_batch(batch, mesh)


def test_accuracy(net, params, net_state, source, config, mesh, max_examples=None) -> dict:
    step = _sharded(make_eval_step(net), mesh, (P(), P(), P(AXIS)), P())
    totals = dict(top1=0, top5=0, count=0)
    for batch in _eval_batches(source, config, mesh, max_examples):
        out = jax.device_get(step(params, net_state, batch))
        totals = {k: totals[k] + int(out[k]) for k in totals}
    n = max(totals["count"], 1)
    return dict(top1=totals["top1"] / n, top5=totals["top5"] / n, num_examples=totals["count"])


def embed(net, params, net_state, source, config, mesh, max_examples=None, ids=None, batches=None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of every (real) example of ``source`` (or of ``ids``), gathered to
    the host; ``batches``: ready ``eval_batches`` to embed instead (e.g. crops kept in memory)."""
    step = _sharded(make_embed_step(net), mesh, (P(), P(), P(AXIS)), (P(AXIS), P(AXIS), P(AXIS)))
    embs, labels = [], []
    for batch in _eval_batches(source, config, mesh, max_examples, ids, batches):
        e, y, m = step(params, net_state, batch)
        e, y, m = (np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in (e, y, m))
        embs.append(e[m])
        labels.append(y[m])
    return np.concatenate(embs), np.concatenate(labels)


def embed_local(net, params, net_state, source, config, mesh, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and image ids of this process's part of ``ids`` (not gathered: each
    process keeps its own rows, so nothing the size of the split lands on one host)."""
    step = _sharded(make_embed_step(net, "image_id"), mesh, (P(), P(), P(AXIS)), (P(AXIS), P(AXIS), P(AXIS)))

    def local(a: jax.Array) -> np.ndarray:
        shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    embs, got = [], []
    for batch in _eval_batches(source, config, mesh, ids=ids):
        e, i, m = (local(a) for a in step(params, net_state, batch))
        embs.append(e[m])
        got.append(i[m])
    return np.concatenate(embs), np.concatenate(got)


def knn_classify(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Weighted k-NN (weights exp(cos / T)); returns class scores [n_test, num_classes]."""
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    train_emb, test_emb = unit(train_emb.astype(np.float32)), unit(test_emb.astype(np.float32))
    k = min(k, len(train_emb))
    scores = np.zeros((len(test_emb), num_classes), np.float32)
    for s in range(0, len(test_emb), chunk):
        sims = test_emb[s:s + chunk] @ train_emb.T
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sims, idx, axis=1)
        w = np.exp(top / temperature)
        np.add.at(scores[s:s + chunk], (np.arange(len(idx))[:, None], train_labels[idx]), w)
    return scores


def topk_accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    order = np.argsort(-scores, axis=1)[:, :5]
    return float(np.mean(order[:, 0] == labels)), float(np.mean(np.any(order == labels[:, None], axis=1)))


def knn_eval(net, params, net_state, train_source, labelled, test_source, config, mesh,
             max_examples=None, support_batches=None, test_batches=None) -> dict:
    """k-NN top-1/top-5 on the test split with the labelled subset as support (``*_batches``:
    those images' ``eval_batches``, made once by a caller that evaluates again and again)."""
    train_emb, train_y = embed(net, params, net_state, train_source, config, mesh, ids=np.flatnonzero(labelled),
                               batches=support_batches)
    test_emb, test_y = embed(net, params, net_state, test_source, config, mesh, max_examples, batches=test_batches)
    scores = knn_classify(train_emb, train_y, test_emb, test_source.num_classes, config.eval.knn_k,
                          config.eval.knn_temperature)
    top1, top5 = topk_accuracy(scores, test_y)
    return dict(top1=top1, top5=top5, num_examples=int(len(test_y)), support_size=int(len(train_y)))


def pixel_knn(config: Any, train_source=None, labelled: np.ndarray | None = None, test_source=None) -> dict:
    """The baseline that needs no training: the same weighted k-NN as ``knn_eval``, on the
    raw pixels of the same centre crops (support: the labelled subset). Host-side."""
    train_source = train_source or datasets.load_split(config, config.dataset.train_split)
    test_source = test_source or datasets.load_split(config, config.dataset.eval_split, labels_needed=False,
                                                     classes=train_source.class_names)
    labelled = datasets.config_labelled_mask(config, train_source) if labelled is None else labelled

    def pixels(source, ids=None):
        xs, ys = [], []
        for b in input_pipeline.eval_dataset(source, config, 256, ids=ids).as_numpy_iterator():
            xs.append(b["image"][b["mask"]].reshape(int(b["mask"].sum()), -1).astype(np.float32))
            ys.append(b["label"][b["mask"]])
        return np.concatenate(xs), np.concatenate(ys)

    support_x, support_y = pixels(train_source, np.flatnonzero(labelled))
    test_x, test_y = pixels(test_source)
    scores = knn_classify(support_x, support_y, test_x, test_source.num_classes, config.eval.knn_k,
                          config.eval.knn_temperature)
    top1, top5 = topk_accuracy(scores, test_y)
    return dict(top1=top1, top5=top5, num_examples=int(len(test_y)), support_size=int(len(support_y)))


def train_classifier(config: Any, train_source, labelled: np.ndarray, test_source, mesh,
                     pretrained: tuple[dict, dict] | None, protocol: str) -> dict:
    """Fine-tune (encoder + head) or linear (frozen encoder) training, then test accuracy."""
    net, state, result = fit_classifier(config, train_source, labelled, mesh, pretrained, protocol)
    accuracy = test_accuracy(net, state.params, state.net_state, test_source, config, mesh)
    return dict(accuracy, **result)


def fit_classifier(config: Any, train_source, labelled: np.ndarray, mesh, pretrained: tuple[dict, dict] | None,
                   protocol: str) -> tuple[hk.TransformedWithState, ClassifierState, dict]:
    """The classifier trained by ``protocol``: 'finetune' moves the encoder and its BN
    statistics, 'linear' only the head (the encoder runs in inference mode)."""
    e = config.eval
    frozen = protocol == "linear"
    net = make_classifier(config.model, train_source.num_classes, AXIS)
    init_net = make_classifier(config.model, train_source.num_classes, None)
    size = config.views.eval_size
    key = jax.random.key(config.seed + 17)
    params, net_state = init_net.init(key, jnp.zeros((2, size, size, 3)), True)
    if pretrained is not None:
        params, net_state = transplant(params, net_state, *pretrained)
    train_mask = labelled if e.train_on == "labelled" else np.ones_like(labelled)
    num_train = int(train_mask.sum())
    steps_per_epoch = max(1, num_train // e.batch_size)
    total = int(math.ceil(e.num_epochs * steps_per_epoch))
    lr = optax.cosine_decay_schedule(e.base_lr * e.batch_size / 256.0, max(total, 1))
    tx = optax.chain(
        optax.add_decayed_weights(e.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        optax.sgd(lr, momentum=e.momentum, nesterov=True))
    if frozen:  # only the head moves
        labels_tree = {m: {n: ("head" if m.startswith(HEAD) else "frozen") for n in v} for m, v in params.items()}
        tx = optax.multi_transform({"head": tx, "frozen": optax.set_to_zero()}, labels_tree)
    state = sharding.replicate(ClassifierState(params, net_state, tx.init(params), jnp.zeros((), jnp.int32),
                                                  jax.random.key_data(key)), mesh)
    step = _sharded(make_train_step(net, tx, frozen, config.eval.flip), mesh, (P(), P(AXIS)), (P(), P()), (0,))
    view_cfg = copy.deepcopy(config)
    view_cfg.views.update(dict(num_large=1, num_small=0, large_size=size, large_scale=tuple(e.crop_scale)))
    view_cfg.dataset.labelled_per_batch = None
    view_cfg.views.transpose_images = False
    local_batch = e.batch_size // jax.process_count()
    ds = input_pipeline.train_dataset(train_source, train_mask, view_cfg, local_batch, config.seed + 1,
                                      jax.process_index(), jax.process_count(), only_labelled=True)
    it = ds.as_numpy_iterator()
    loss = float("nan")
    for i in range(total):
        b = next(it)
        batch = sharding.shard_batch(dict(image=b["large"][:, 0], label=b["label"]), mesh)
        state, m = step(state, batch)
        if (i + 1) % max(1, total // 10) == 0 or i + 1 == total:
            loss = float(jax.device_get(m["loss"]))
            logging.info("%s [%d/%d] train loss %.4f", protocol, i + 1, total, loss)
    return net, state, dict(train_loss=loss, train_examples=num_train, steps=total)


class OnlineKnn:
    """k-NN top-1 of the current online encoder during pretraining (a monitor).

    The support's and the test images' centre crops are decoded once, at the first
    evaluation, and kept in host memory (``eval_size``² x 3 bytes an image: 150 KB at
    224, 30 MB a host for ImageNet's 1% on 64 hosts); later evaluations read nothing."""

    def __init__(self, config: Any, train_source, labelled: np.ndarray, mesh, index_dir: str | None = None):
        self._config, self._train, self._labelled, self._mesh = config, train_source, labelled, mesh
        self._test = datasets.load_split(config, config.dataset.eval_split, index_dir, labels_needed=False,
                                         classes=train_source.class_names)
        self._support_batches = eval_batches(train_source, config, ids=np.flatnonzero(labelled), keep_crops=True)
        self._test_batches = eval_batches(self._test, config, config.training.eval_max_examples, keep_crops=True)
        self._net = make_classifier(config.model, train_source.num_classes, None)
        size = config.views.eval_size
        params, _ = jax.eval_shape(lambda: self._net.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), True))
        self._head = {HEAD: {n: jnp.zeros(v.shape, v.dtype) for n, v in params[HEAD].items()}}

    def __call__(self, online_params: dict, online_state: dict) -> dict:
        params = {m: v for m, v in online_params.items() if m not in ("projector", "predictor", "classifier")}
        params.update(sharding.replicate(self._head, self._mesh))
        result = knn_eval(self._net, params, online_state, self._train, self._labelled, self._test, self._config,
                          self._mesh, self._config.training.eval_max_examples, self._support_batches,
                          self._test_batches)
        return {"knn_top1": result["top1"], "knn_top5": result["top5"]}
