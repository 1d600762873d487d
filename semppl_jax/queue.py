"""The pseudo-label queue: labelled embeddings, k-NN votes and semantic positives.

The queue is a fixed-size pytree in the train state (static shapes, donated with
it). It is identical on every replica: each step pushes the *all-gathered*
labelled entries, so k-NN and sampling need no further communication.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

EMPTY_KEY = jnp.iinfo(jnp.int32).max  # the sort key of an empty slot: after every label


class QueueState(NamedTuple):
    embeddings: jax.Array  # [C, D] float32, L2-normalised
    labels: jax.Array  # [C] int32, -1 marks an empty slot
    ids: jax.Array  # [C] int32, the image each entry came from
    pointer: jax.Array  # [] int32, next slot to write (FIFO)
    # [C] int32: the slots ordered by label, empty slots last. ``push`` keeps it sorted
    # by merging (O(C + B log C) a step), so sampling never sorts the queue. None (a
    # queue built by hand) makes ``sample_positives`` sort the labels itself.
    by_label: jax.Array | None = None


def label_keys(labels: jax.Array) -> jax.Array:
    return jnp.where(labels >= 0, labels, EMPTY_KEY)


def init_queue(size: int, dim: int) -> QueueState:
    return QueueState(
        embeddings=jnp.zeros((size, dim), jnp.float32),
        labels=jnp.full((size,), -1, jnp.int32),
        ids=jnp.full((size,), -1, jnp.int32),
        pointer=jnp.zeros((), jnp.int32),
        by_label=jnp.arange(size, dtype=jnp.int32),  # all empty: any order is sorted
    )


def push(queue: QueueState, embeddings: jax.Array, labels: jax.Array, ids: jax.Array,
         valid: jax.Array) -> QueueState:
    """FIFO-pushes the valid rows of a padded block, in block order.

    Invalid rows are dropped; if the block holds more valid rows than the queue,
    only the last ``C`` survive, as if they had been pushed one at a time.
    """
    size = queue.labels.shape[0]
    valid = valid.astype(bool)
    rank = jnp.cumsum(valid) - 1  # position among valid rows
    num_valid = jnp.sum(valid)
    keep = valid & (rank >= num_valid - size)
    slot = jnp.where(keep, (queue.pointer + rank) % size, size)  # `size` = out of range: dropped
    labels = labels.astype(jnp.int32)
    by_label = None if queue.by_label is None else merge_by_label(queue.by_label, queue.labels, slot, labels)
    return QueueState(
        embeddings=queue.embeddings.at[slot].set(embeddings.astype(queue.embeddings.dtype), mode="drop"),
        labels=queue.labels.at[slot].set(labels, mode="drop"),
        ids=queue.ids.at[slot].set(ids.astype(jnp.int32), mode="drop"),
        pointer=((queue.pointer + num_valid) % size).astype(jnp.int32),
        by_label=by_label,
    )


def merge_by_label(by_label: jax.Array, old_labels: jax.Array, slot: jax.Array, labels: jax.Array) -> jax.Array:
    """The label order after overwriting ``slot`` (``[B]``, ``C`` = not written) with
    ``labels``: the untouched entries keep their order and the new ones are merged in.

    O(C + B log C) with static shapes (a few passes over C, no search per entry),
    against O(C log C) for sorting again. Each new entry's position is its rank among
    the new ones plus the untouched entries with a key <= its own; the untouched
    entries fill the remaining positions in their order. Within a label, untouched
    entries come first; sampling draws a uniform position in the label's segment, so
    any order within a label serves.
    """
    size = by_label.shape[0]
    written = jnp.zeros((size,), bool).at[slot].set(True, mode="drop")
    stays = ~written[by_label]  # [C], in label order
    stays_upto = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(stays, dtype=jnp.int32)])
    # The new entries, sorted by key; rows that write nothing go last (their rank
    # among the rows is after every written row's, and their label empty).
    live = slot < size
    num_live = jnp.sum(live, dtype=jnp.int32)
    row = jnp.where(live, jnp.cumsum(live, dtype=jnp.int32) - 1, num_live + jnp.cumsum(~live, dtype=jnp.int32) - 1)
    new_key, new_row = sort_by_label(jnp.where(live, labels, -1), row)
    new_slot = jnp.zeros_like(slot).at[row].set(slot)[new_row]
    old_keys = label_keys(old_labels)[by_label]
    new_pos = jnp.arange(slot.shape[0], dtype=jnp.int32) + stays_upto[
        jnp.searchsorted(old_keys, new_key, side="right")]
    new_pos = jnp.where(new_row < num_live, new_pos, size)
    taken = jnp.zeros((size,), bool).at[new_pos].set(True, mode="drop")
    in_order = jnp.zeros((size,), jnp.int32).at[jnp.where(stays, stays_upto[:-1], size)].set(by_label, mode="drop")
    free_rank = jnp.cumsum(~taken, dtype=jnp.int32) - 1  # the i-th free position takes the i-th untouched entry
    return in_order[jnp.maximum(free_rank, 0)].at[new_pos].set(new_slot, mode="drop")


def fill_fraction(queue: QueueState) -> jax.Array:
    return jnp.mean((queue.labels >= 0).astype(jnp.float32))


def weighted_vote(labels: jax.Array, weights: jax.Array, valid: jax.Array, num_classes: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Majority label per row; ties go to the larger summed weight.

    ``labels``/``weights``/``valid``: ``[n, m]``, weights in ``[-1, 1]``. Returns the
    label (``-1`` where no row entry is valid) and the winner's mean weight.
    """
    m = labels.shape[-1]
    onehot = jax.nn.one_hot(jnp.where(valid, labels, -1), num_classes, dtype=jnp.float32)  # [n, m, K]
    counts = jnp.sum(onehot, axis=1)
    summed = jnp.einsum("nmk,nm->nk", onehot, weights.astype(jnp.float32))
    # Lexicographic (count, summed weight): summed + m lies in [0, 2m] < 2m + 1.
    score = jnp.where(counts > 0, counts * (2 * m + 1) + summed + m, -1.0)
    winner = jnp.argmax(score, axis=-1)
    has_any = jnp.any(valid, axis=-1)
    win_count = jnp.take_along_axis(counts, winner[:, None], axis=-1)[:, 0]
    win_mean = jnp.take_along_axis(summed, winner[:, None], axis=-1)[:, 0] / jnp.maximum(win_count, 1)
    return jnp.where(has_any, winner, -1).astype(jnp.int32), jnp.where(has_any, win_mean, 0.0)


def _neighbours(queue: QueueState, queries: jax.Array, k: int, approx: bool = False,
                exclude_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Labels, similarities and validity ``[n, k]`` of each query's k nearest filled
    entries, leaving out the entries of ``exclude_ids`` (the query's own image)."""
    sims = queries.astype(jnp.float32) @ queue.embeddings.T  # cosine: both sides normalised
    usable = (queue.labels >= 0)[None, :]
    if exclude_ids is not None:
        usable = usable & (queue.ids[None, :] != exclude_ids[:, None])
    masked = jnp.where(usable, sims, -jnp.inf)
    if k == 1:
        top_idx = jnp.argmax(masked, axis=-1)[:, None]
        top_sims = jnp.take_along_axis(masked, top_idx, axis=-1)
    elif approx:
        top_sims, top_idx = jax.lax.approx_max_k(masked, k)
    else:
        top_sims, top_idx = jax.lax.top_k(masked, k)
    valid = jnp.isfinite(top_sims)
    return queue.labels[top_idx], jnp.where(valid, top_sims, 0.0), valid


def knn_vote(queue: QueueState, queries: jax.Array, k: int, num_classes: int, approx: bool = False,
             exclude_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """k-NN majority vote of normalised ``queries`` [n, D] over the filled queue entries.

    k = 1 is an argmax (no sort over the C entries); ``approx`` uses
    ``lax.approx_max_k`` (TPU's fast partial reduction; exact on CPU/GPU).
    """
    labels, sims, valid = _neighbours(queue, queries, k, approx, exclude_ids)
    return weighted_vote(labels, sims, valid, num_classes)


class Votes(NamedTuple):
    """One k-NN pseudo-label per image, and how sure the vote was (no ground truth needed)."""

    label: jax.Array  # [n] the mode of the views' votes (-1: the queue is empty)
    share: jax.Array  # [n] the label's share of all L x k neighbours
    margin: jax.Array  # [n] that share less the runner-up class's
    agreement: jax.Array  # [n] fraction of views whose own vote is the label


def vote(queue: QueueState, queries: jax.Array, k: int, num_classes: int, approx: bool = False,
         exclude_ids: jax.Array | None = None) -> Votes:
    """Per-view k-NN votes of ``queries`` [L, n, D] -> :class:`Votes`.

    Views that disagree equally are settled by the larger mean similarity of the
    view's winning neighbours. ``exclude_ids`` [n] leaves each image's own entries
    out (a labelled image voted by the others: a ground-truth-free accuracy)."""
    labels, sims, valid = jax.vmap(lambda q: _neighbours(queue, q, k, approx, exclude_ids))(queries)  # [L, n, k]
    per_view, strength = jax.vmap(lambda a, b, c: weighted_vote(a, b, c, num_classes))(labels, sims, valid)
    label, _ = weighted_vote(per_view.T, strength.T, per_view.T >= 0, num_classes)
    counts = jnp.sum(jax.nn.one_hot(jnp.where(valid, labels, -1), num_classes, dtype=jnp.float32), axis=(0, 2))
    total = jnp.maximum(jnp.sum(valid, axis=(0, 2)), 1).astype(jnp.float32)  # [n]
    mine = jnp.take_along_axis(counts, jnp.maximum(label, 0)[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(label, num_classes, dtype=bool), -1.0, counts)
    runner_up = jnp.maximum(jnp.max(others, axis=-1), 0.0)
    has = label >= 0
    return Votes(label=label, share=jnp.where(has, mine / total, 0.0),
                 margin=jnp.where(has, (mine - runner_up) / total, 0.0),
                 agreement=jnp.mean((per_view == label[None, :]).astype(jnp.float32), axis=0))


def pseudo_labels(queue: QueueState, queries: jax.Array, k: int, num_classes: int, approx: bool = False
                  ) -> jax.Array:
    """Per-view k-NN votes [L, n, D] -> one label per image: the mode over views."""
    return vote(queue, queries, k, num_classes, approx).label


def class_occupancy(queue: QueueState, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """The smallest class's share of the filled entries relative to an even split
    (1: even, 0: a class is missing) and the label entropy over log(classes)."""
    counts = jnp.sum(jax.nn.one_hot(queue.labels, num_classes, dtype=jnp.float32), axis=0)
    total = jnp.maximum(jnp.sum(counts), 1.0)
    p = counts / total
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.min(counts) * num_classes / total, entropy / jnp.log(max(num_classes, 2))


# Tries per semantic positive: a try is a uniform draw from the label's segment,
# rejected if it is one of the image's own entries. A draw fails (and is dropped, as
# an invalid positive) only if all tries hit own entries: probability
# (own / segment)^64, e.g. 5e-12 when two of three entries are the image's own.
POSITIVE_TRIES = 64


def sort_by_label(labels: jax.Array, payload: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(label keys, payload)`` ordered by label then payload, empty (``-1``) labels
    last with key ``EMPTY_KEY``; the payload (default: the slots ``0..n-1``) must lie
    in ``[0, n)``.

    When the labels fit, label and payload are packed into one int32 and sorted as a
    single key (XLA sorts one operand several times faster than key + payload);
    otherwise a two-key sort. Both give the same order.
    """
    size = labels.shape[0]
    payload = jnp.arange(size, dtype=jnp.int32) if payload is None else payload.astype(jnp.int32)
    bits = max(1, int(size - 1).bit_length())
    empty = (1 << (31 - bits)) - 1  # the largest label key that packs

    def packed(_):
        key = jnp.sort((jnp.where(labels >= 0, labels, empty) << bits) | payload)
        label = key >> bits
        return jnp.where(label == empty, EMPTY_KEY, label), key & ((1 << bits) - 1)

    def general(_):
        return jax.lax.sort((label_keys(labels), payload), num_keys=2)

    return jax.lax.cond(jnp.max(labels) < empty, packed, general, None)


def indexed(queue: QueueState) -> QueueState:
    """``queue`` with its label order computed from scratch (for a queue built by hand)."""
    return queue._replace(by_label=sort_by_label(queue.labels)[1])


def sample_positives(key: jax.Array, queue: QueueState, labels: jax.Array, ids: jax.Array,
                     global_index: jax.Array, num_positives: int) -> tuple[jax.Array, jax.Array]:
    """Draws M queue entries per image, uniformly with replacement, among entries
    with the image's (pseudo-)label and another image's id.

    In the queue's label order (``by_label``, kept sorted by ``push``) each label is
    one segment, found by ``searchsorted``; a draw is a uniform position in the
    image's segment, redrawn while it lands on one of the image's own entries
    (rejection: exactly uniform over the eligible entries). O(C + n M log C) with no
    ``[n, C]`` matrix and no sort (O(C log C) for a queue without ``by_label``).
    Returns embeddings ``[n, M, D]`` and a validity mask ``[n, M]``: False where the
    image has no label or no eligible entry (and, with probability
    (own / segment)^64, for a draw whose every try hit an own entry). Keys are
    folded with the global image index, so draws do not depend on the device layout.
    """
    if queue.by_label is None:
        sorted_label, order = sort_by_label(queue.labels)
    else:
        order = queue.by_label
        sorted_label = label_keys(queue.labels[order])
    start = jnp.searchsorted(sorted_label, labels, side="left").astype(jnp.int32)
    count = jnp.searchsorted(sorted_label, labels, side="right").astype(jnp.int32) - start
    count = jnp.where(labels >= 0, count, 0)

    def draw(idx: jax.Array, n: jax.Array) -> jax.Array:
        return jax.random.randint(jax.random.fold_in(key, idx), (num_positives, POSITIVE_TRIES), 0,
                                  jnp.maximum(n, 1))

    tries = order[start[:, None, None] + jax.vmap(draw)(global_index, count)]  # [n, M, T] slots
    ok = (queue.ids[tries] != ids[:, None, None]) & (count > 0)[:, None, None]
    first = jnp.argmax(ok, axis=-1)  # the first accepted try
    chosen = jnp.take_along_axis(tries, first[..., None], axis=-1)[..., 0]
    valid = jnp.take_along_axis(ok, first[..., None], axis=-1)[..., 0]
    return queue.embeddings[chosen], valid
