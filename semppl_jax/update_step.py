"""The SemPPL update step, written per replica and mapped over a 1-D ``data`` mesh.

Read top to bottom, one step is (numbers refer to ``docs/method.md``):
augment views on device -> target projections, all-gathered (the negatives and
k-NN queries) -> pseudo-labels by k-NN over the queue (3) -> semantic positives,
kept where the vote passes the vote-share gate (4) -> online forward and the loss
``c (L_augm + alpha L_sempos) + lambda I`` (1, 2, 5, 6) -> gradients averaged over
replicas, LARS, target EMA (7) -> enqueue the all-gathered labelled entries (8) ->
monitors (9).

Every per-example random draw is keyed by the image's global index, and every
data-dependent normalisation (semantic positives, probe) is by a global count,
so one step on 8 devices equals the same step on 1 device
(``tests/test_sharded_step.py``).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from semppl_jax import augment, losses, networks, optim, vote_gate
from semppl_jax import queue as pl_queue
from semppl_jax.sharding import AXIS, global_mean


class TrainState(NamedTuple):
    online_params: hk.Params
    online_state: hk.State
    target_params: hk.Params
    target_state: hk.State
    opt_state: optax.OptState
    queue: pl_queue.QueueState
    step: jax.Array  # [] int32
    rng: jax.Array  # raw uint32 key data (checkpoints hold plain arrays)


class StepInputs(NamedTuple):
    """What the loss may read. Ground truth of unlabelled images is not here."""

    large: jax.Array  # [b, L, H, W, 3] uint8
    small: jax.Array  # [b, S, h, w, 3] uint8
    label: jax.Array  # [b] int32, -1 where unlabelled
    is_labelled: jax.Array  # [b] bool
    image_id: jax.Array  # [b] int32, unique per training image


def split_batch(batch: Mapping[str, jax.Array]) -> tuple[StepInputs, jax.Array]:
    """Separates the loss's inputs from ``true_label``, which only monitors see."""
    inputs = StepInputs(large=batch["large"], small=batch["small"], label=batch["label"],
                        is_labelled=batch["is_labelled"], image_id=batch["image_id"])
    return inputs, batch["true_label"]


@functools.cache
def _pairs(num_views: int, num_large: int, same_crop: bool):
    return losses.view_pairs(num_views, num_large, same_crop), losses.large_view_pairs(num_large)


def make_network(config: Any, num_classes: int, axis_name: str | None = AXIS) -> hk.TransformedWithState:
    return networks.make_network(config.model, num_classes, axis_name, config.training.compute_dtype)


def make_schedules(config: Any, total_steps: int, steps_per_epoch: int):
    lr = optim.learning_rate_schedule(config.optim.base_lr, config.training.batch_size, total_steps,
                                      int(round(config.optim.warmup_epochs * steps_per_epoch)))
    tau = optim.target_ema_schedule(config.optim.ema_base, total_steps)
    return lr, tau


def init_state(config: Any, key: jax.Array, num_classes: int, total_steps: int,
               steps_per_epoch: int) -> TrainState:
    """Initial state (run un-mapped: BN needs no axis at init)."""
    net = make_network(config, num_classes, axis_name=None)
    size = config.views.large_size
    params, state = net.init(key, jnp.zeros((2, size, size, 3), jnp.float32), True)
    lr, _ = make_schedules(config, total_steps, steps_per_epoch)
    opt_state = optim.make_optimizer(config.optim, lr).init(params)
    return TrainState(
        online_params=params, online_state=state,
        target_params=jax.tree.map(jnp.copy, params), target_state=jax.tree.map(jnp.copy, state),
        opt_state=opt_state,
        queue=pl_queue.init_queue(config.semppl.queue_size, config.model.projection_size),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.fold_in(key, 1)),
    )


def _views_first(images: jax.Array, transposed: bool) -> jax.Array:
    """[b, V, H, W, C] or the HWCN transfer layout [V, H, W, C, b] -> [V, b, H, W, C]."""
    return jnp.transpose(images, (0, 4, 1, 2, 3)) if transposed else jnp.swapaxes(images, 0, 1)


def _flatten_views(views: jax.Array) -> jax.Array:
    """[V, b, ...] -> [V*b, ...]: all views of a kind through the network at once."""
    return views.reshape((-1,) + views.shape[2:])


def make_update_step(config: Any, num_classes: int, total_steps: int, steps_per_epoch: int
                     ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """Returns the per-replica step ``(state, local batch) -> (state, metrics)``."""
    net = make_network(config, num_classes)
    lr_schedule, tau_schedule = make_schedules(config, total_steps, steps_per_epoch)
    optimizer = optim.make_optimizer(config.optim, lr_schedule)
    cfg = config.semppl
    num_large, num_small = config.views.num_large, config.views.num_small
    pairs, large_pairs = _pairs(num_large + num_small, num_large, cfg.same_crop_pairs)
    transposed = bool(config.views.transpose_images)

    def update_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        inputs, true_label = split_batch(batch)
        local_batch = inputs.label.shape[0]
        num_replicas = jax.lax.psum(1, AXIS)
        global_batch = local_batch * num_replicas
        global_index = jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        aug_key, neg_key, pos_key, gate_key = jax.random.split(key, 4)

        # Views: [b, V, H, W, 3] (or HWCN: [V, H, W, 3, b]) uint8 -> [V, b, H, W, 3] augmented float.
        large = augment.augment_views(aug_key, _views_first(inputs.large, transposed), 0, global_index,
                                      config.augment)
        small = augment.augment_views(aug_key, _views_first(inputs.small, transposed), num_large,
                                      global_index, config.augment) if num_small else None

        # Target projections of the large views; gathered: the global candidates.
        target_out, target_state = net.apply(state.target_params, state.target_state, None,
                                             _flatten_views(large), True, ("projection",))
        target_proj = losses.l2_normalize(target_out["projection"]).reshape(num_large, local_batch, -1)
        target_proj = jax.lax.stop_gradient(target_proj)
        candidates = jax.lax.all_gather(target_proj, AXIS, axis=1, tiled=True)  # [L, B, D]
        candidate_mask = losses.sample_candidate_mask(neg_key, global_index, global_index,
                                                      global_batch, cfg.num_negatives)

        def online_predictions(params):
            out, net_state = net.apply(params, state.online_state, None, _flatten_views(large), True)
            preds = [out["prediction"].reshape(num_large, local_batch, -1)]
            if small is not None:
                # The small views' BN statistics are not kept: the moving averages
                # serve full-size images at evaluation, so they follow the large views.
                out_small, _ = net.apply(params, net_state, None, _flatten_views(small), True, ("prediction",))
                preds.append(out_small["prediction"].reshape(num_small, local_batch, -1))
            return losses.l2_normalize(jnp.concatenate(preds)), out, net_state

        # Pseudo-labels (3) and semantic positives (4): no gradient, queue as it was.
        if cfg.knn_query == "target":
            queries = target_proj
        else:
            queries = jax.lax.stop_gradient(online_predictions(state.online_params)[0][:num_large])
        # Each image's own entries are left out: only labelled images have entries, so this
        # changes no unlabelled image's label and gives the labelled ones a held-out vote.
        votes = pl_queue.vote(state.queue, queries, cfg.knn_k, num_classes, cfg.knn_approx,
                              exclude_ids=inputs.image_id)
        pseudo = votes.label
        working_label = jnp.where(inputs.is_labelled, inputs.label, pseudo)
        positives, positive_valid = pl_queue.sample_positives(
            pos_key, state.queue, working_label, inputs.image_id, global_index, cfg.num_positives)
        if cfg.positives_after_queue_full:  # departs from the paper: see default_config
            positive_valid &= pl_queue.fill_fraction(state.queue) >= 1.0
        # Unsure votes draw no semantic positive (docs/method.md, step 4): a wrong-class
        # positive pulls two classes together. Labelled images keep theirs.
        held_out, threshold = _vote_gate(state.queue, gate_key, cfg, num_large, num_classes, num_replicas)
        sure = inputs.is_labelled | (votes.share >= threshold)
        gated = cfg.min_vote_share > 0 or cfg.min_vote_precision > 0
        sure_weight = sure.astype(jnp.float32) if gated else None

        def loss_fn(params):
            online, out, net_state = online_predictions(params)
            logits = out["logits"]
            # One [V, L, b, B] similarity tensor serves all three terms.
            sh = losses.shared_logits(online, candidates, global_index, cfg.temperature, candidate_mask)
            l_augm = losses.augmentation_from(sh, pairs)
            invariance = losses.invariance_from(sh, large_pairs) if cfg.lam else jnp.zeros((), jnp.float32)
            if cfg.alpha != 0.0:
                sem_sum, sem_count = losses.semantic_positive_from(sh, online, positives, positive_valid, pairs,
                                                                   cfg.temperature, sure_weight)
                l_sempos_share, l_sempos = global_mean(sem_sum, sem_count)
            else:  # the ReLICv2-style baseline, exactly: the term is not built at all
                l_sempos_share = l_sempos = jnp.zeros((), jnp.float32)
            objective = cfg.c * (l_augm + cfg.alpha * l_sempos_share) + cfg.lam * invariance
            # Online probe (a monitor): cross-entropy on labelled images only,
            # on a stop-gradient embedding, so it trains the classifier alone.
            probe_labels = jnp.tile(inputs.label, num_large)
            probe_ce = optax.softmax_cross_entropy_with_integer_labels(
                logits, jnp.maximum(probe_labels, 0))
            probe_mask = (probe_labels >= 0).astype(jnp.float32)
            probe_share, probe_loss = global_mean(jnp.sum(probe_ce * probe_mask), jnp.sum(probe_mask))
            aux = dict(net_state=net_state, logits=logits, l_augm=l_augm, invariance=invariance,
                       projection=jax.lax.stop_gradient(out["projection"]),
                       l_sempos=l_sempos, probe_loss=probe_loss,
                       objective=cfg.c * (l_augm + cfg.alpha * l_sempos) + cfg.lam * invariance)
            return objective + probe_share, aux

        grads, aux = jax.grad(loss_fn, has_aux=True)(state.online_params)
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.online_params)
        online_params = optax.apply_updates(state.online_params, updates)
        tau = tau_schedule(state.step)
        target_params = optim.ema_update(state.target_params, online_params, tau)

        # Enqueue (8): every replica pushes the same gathered block, after the loss.
        all_labels = jax.lax.all_gather(inputs.label, AXIS, tiled=True)
        all_ids = jax.lax.all_gather(inputs.image_id, AXIS, tiled=True)
        all_labelled = jax.lax.all_gather(inputs.is_labelled, AXIS, tiled=True)
        new_queue = pl_queue.push(
            state.queue,
            jnp.swapaxes(candidates, 0, 1).reshape(global_batch * num_large, -1),  # image-major
            jnp.repeat(all_labels, num_large), jnp.repeat(all_ids, num_large),
            jnp.repeat(all_labelled, num_large))

        metrics = _monitors(aux, inputs, true_label, votes, positive_valid, sure, num_large, num_classes)
        estimate = vote_gate.pseudo_label_estimate(held_out, metrics["pseudo_label_vote_share"])
        metrics.update(vote_share_threshold=threshold, queue_held_out_accuracy=estimate["raw"],
                       queue_held_out_images=estimate["images"], queue_held_out_vote_share=estimate["held_out_share"],
                       pseudo_label_accuracy_estimate=estimate["estimate"],  # label-free, with its interval
                       pseudo_label_accuracy_low=estimate["low"], pseudo_label_accuracy_high=estimate["high"])
        num_candidates = global_batch if cfg.num_negatives is None else min(cfg.num_negatives + 1, global_batch)
        metrics["l_augm_ratio"] = metrics["l_augm"] / np.log(num_candidates)
        min_share, entropy = pl_queue.class_occupancy(new_queue, num_classes)
        metrics.update(queue_fill=pl_queue.fill_fraction(new_queue), queue_min_class_share=min_share,
                       queue_class_entropy=entropy, learning_rate=lr_schedule(state.step), tau=tau)
        # Replicated (params are identical on every replica): the launcher refuses to save
        # a non-finite state, and every process reads the same flag.
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & _all_finite(online_params)
        new_state = TrainState(online_params, aux["net_state"], target_params, target_state, opt_state,
                               new_queue, state.step + 1, state.rng)
        return new_state, metrics

    return update_step


def _vote_gate(queue: pl_queue.QueueState, key: jax.Array, cfg: Any, num_large: int, num_classes: int,
               num_replicas: int) -> tuple[vote_gate.HeldOutVotes, jax.Array]:
    """The gate's held-out votes (all replicas' share, gathered) and its vote-share
    threshold: the larger of the fixed floor and the measured one (``vote_gate``)."""
    per_replica = -(-cfg.gate_samples // num_replicas)
    slots = vote_gate.sample_images(key, queue.labels.shape[0], num_large, per_replica * num_replicas)
    mine = jax.lax.dynamic_slice_in_dim(slots, jax.lax.axis_index(AXIS) * per_replica, per_replica)
    local = vote_gate.held_out_votes(queue, mine, num_large, cfg.knn_k, num_classes, cfg.knn_approx)
    held_out = jax.tree.map(lambda x: jax.lax.all_gather(x, AXIS, tiled=True), local)
    threshold = jnp.asarray(cfg.min_vote_share, jnp.float32)
    if cfg.min_vote_precision > 0:
        z = statistics.NormalDist().inv_cdf(cfg.gate_confidence) if cfg.gate_confidence > 0.5 else 0.0
        threshold = jnp.maximum(threshold, vote_gate.share_threshold(held_out, cfg.min_vote_precision, z))
    return held_out, threshold


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _monitors(aux: dict, inputs: StepInputs, true_label: jax.Array, votes: pl_queue.Votes,
              positive_valid: jax.Array, sure: jax.Array, num_large: int, num_classes: int) -> dict:
    """Global (all-replica) monitors. ``true_label`` is read here and nowhere else, and only
    by those that need ground truth (``pseudo_label_accuracy``, ``probe_accuracy``); the
    others need none: the leave-own-out k-NN accuracy of the labelled images and how sure
    the unlabelled images' votes are."""
    def ratio(num, den):
        return jax.lax.psum(num, AXIS) / jnp.maximum(jax.lax.psum(den, AXIS), 1.0)

    pseudo = votes.label
    no_label = ~inputs.is_labelled
    by_class = jax.nn.one_hot(inputs.label, num_classes, dtype=jnp.float32)  # zero rows where unlabelled
    loo_per_class = jax.lax.psum(jnp.stack([jnp.sum(by_class * (pseudo == inputs.label)[:, None], 0),
                                            jnp.sum(by_class, 0)]), AXIS)  # [2, C]: right, voted

    unlabelled = (~inputs.is_labelled) & (true_label >= 0)
    correct_pl = (pseudo == true_label) & unlabelled
    probe_pred = jnp.argmax(aux["logits"], axis=-1)
    probe_target = jnp.tile(true_label, num_large)
    probe_valid = jnp.tile(unlabelled, num_large)
    # Collapse monitor: per-dimension std over the global batch of the normalised online
    # projections (large views), averaged over dimensions: ~1/sqrt(D) healthy, 0 collapsed.
    proj = losses.l2_normalize(aux["projection"])
    n = jax.lax.psum(proj.shape[0], AXIS)
    mean = jax.lax.psum(jnp.sum(proj, 0), AXIS) / n
    var = jax.lax.psum(jnp.sum(jnp.square(proj - mean), 0), AXIS) / n
    return dict(
        embedding_std=jnp.mean(jnp.sqrt(jnp.maximum(var, 0.0))),
        loss=jax.lax.pmean(aux["objective"], AXIS),
        l_augm=jax.lax.pmean(aux["l_augm"], AXIS),
        invariance=jax.lax.pmean(aux["invariance"], AXIS),
        l_sempos=aux["l_sempos"],
        probe_loss=aux["probe_loss"],
        pseudo_label_accuracy=ratio(jnp.sum(correct_pl), jnp.sum(unlabelled)),
        pseudo_label_coverage=ratio(jnp.sum((pseudo >= 0) & unlabelled), jnp.sum(unlabelled)),
        # Images whose semantic positive enters the loss (drawn, and labelled or voted surely).
        semantic_positive_fraction=ratio(jnp.sum(positive_valid[:, 0] & sure), jnp.asarray(pseudo.shape[0])),
        sure_vote_fraction=ratio(jnp.sum(sure & no_label), jnp.sum(no_label)),
        sure_pseudo_label_accuracy=ratio(jnp.sum(correct_pl & sure), jnp.sum(unlabelled & sure)),
        probe_accuracy=ratio(jnp.sum((probe_pred == probe_target) & probe_valid), jnp.sum(probe_valid)),
        # How many unlabelled images had a hidden label to score against (0 on own data): the
        # launcher logs no hidden-label accuracy where there is none to compute.
        hidden_labels=jax.lax.psum(jnp.sum(unlabelled).astype(jnp.float32), AXIS),
        hidden_labels_right=jax.lax.psum(jnp.sum(correct_pl).astype(jnp.float32), AXIS),  # summed by the launcher
        sure_hidden_labels=jax.lax.psum(jnp.sum(unlabelled & sure).astype(jnp.float32), AXIS),
        labelled_fraction=ratio(jnp.sum(inputs.is_labelled), jnp.asarray(pseudo.shape[0])),
        loo_knn_accuracy=ratio(jnp.sum((pseudo == inputs.label) & inputs.is_labelled), jnp.sum(inputs.is_labelled)),
        loo_per_class=loo_per_class,  # an array: summed between log steps by the launcher
        pseudo_label_vote_share=ratio(jnp.sum(jnp.where(no_label, votes.share, 0.0)), jnp.sum(no_label)),
        pseudo_label_margin=ratio(jnp.sum(jnp.where(no_label, votes.margin, 0.0)), jnp.sum(no_label)),
        pseudo_label_view_agreement=ratio(jnp.sum(jnp.where(no_label, votes.agreement, 0.0)), jnp.sum(no_label)),
    )
