"""Which unlabelled images draw semantic positives: the vote-share gate.

A wrong pseudo-label's semantic positive pulls two classes together, and the
next votes, cast in that embedding, go wrong more often. The gate passes an
unlabelled image only if its k-NN vote share reaches a threshold. The
threshold is measured every step without ground truth: labelled images in the
queue are voted by the *other* labelled entries (their own left out), and the
threshold is the lowest vote share at which those held-out votes are at least
``min_vote_precision`` right. Where the held-out votes are never that right
(e.g. one labelled image a class: no other entry of its class), the gate
closes; where they are right at any share, it opens fully, as in the paper.

How sure is a precision measured on a few images? The sampled slots are drawn with
replacement, and a queue may hold few labelled images (one class's four at 1% of a
small set), so what the threshold rests on is the number of *distinct* images voted.
With ``confidence`` above 0.5 the threshold needs the Wilson lower bound of the
precision, over that many images, to reach ``min_precision``: the gate acts on the
cautious end. ``pseudo_label_estimate`` turns the same votes into the label-free
estimate of the unlabelled images' pseudo-label accuracy, with its interval.

The queue is identical on every replica; each replica votes its share of the
sampled images and the results are all-gathered, so every replica derives the
same threshold.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from semppl_jax import queue as pl_queue

CLOSED = 2.0  # a threshold no vote share (at most 1) reaches


class HeldOutVotes(NamedTuple):
    """Leave-own-out votes of labelled images sampled from the queue."""

    share: jax.Array  # [n] the vote's share of the L x k neighbours
    correct: jax.Array  # [n] bool: the vote is the entry's label
    valid: jax.Array  # [n] bool: the sampled slot holds one labelled image's L views
    image: jax.Array  # [n] int32: the image's id (-1 where not valid)


def sample_images(key: jax.Array, queue_size: int, num_large: int, num: int) -> jax.Array:
    """``num`` image slots, uniform with replacement. ``push`` writes each labelled
    image's L views to L consecutive entries from a multiple of L (``queue_size`` is
    checked to be one), so slot ``g`` is entries ``g L .. g L + L - 1``."""
    return jax.random.randint(key, (num,), 0, queue_size // num_large)


def held_out_votes(queue: pl_queue.QueueState, slots: jax.Array, num_large: int, k: int,
                   num_classes: int, approx: bool = False) -> HeldOutVotes:
    """Votes each slot's L views over the queue with the image's own entries left
    out: the same vote an unlabelled image gets, on an image whose label is known."""
    entries = slots[:, None] * num_large + jnp.arange(num_large)[None, :]  # [n, L]
    queries = jnp.swapaxes(queue.embeddings[entries], 0, 1)  # [L, n, D]
    labels, ids = queue.labels[entries], queue.ids[entries]
    valid = jnp.all(labels >= 0, axis=1) & jnp.all(ids == ids[:, :1], axis=1)  # one image's L views
    votes = pl_queue.vote(queue, queries, k, num_classes, approx, exclude_ids=ids[:, 0])
    return HeldOutVotes(share=votes.share, correct=valid & (votes.label == labels[:, 0]), valid=valid,
                        image=jnp.where(valid, ids[:, 0], -1))


def distinct_images(held_out: HeldOutVotes) -> jax.Array:
    """How many different images the valid votes are of (slots are drawn with replacement)."""
    ids = jnp.sort(held_out.image)
    first = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    return jnp.sum(first & (ids >= 0)).astype(jnp.float32)


def wilson(p: jax.Array, n: jax.Array, z: float) -> tuple[jax.Array, jax.Array]:
    """Wilson's score interval for a proportion ``p`` seen over ``n`` items, at ``z``; [0, 1] for n = 0."""
    n = jnp.maximum(n, 1e-9)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * jnp.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    empty = n < 0.5
    return jnp.where(empty, 0.0, jnp.clip(centre - half, 0, 1)), jnp.where(empty, 1.0, jnp.clip(centre + half, 0, 1))


def pseudo_label_estimate(held_out: HeldOutVotes, unlabelled_share: jax.Array, z: float = 1.96
                          ) -> dict[str, jax.Array]:
    """The label-free estimate of the unlabelled images' pseudo-label accuracy, with how sure it is.

    The held-out votes of labelled images are scored against their labels; two things make
    their accuracy differ from the unlabelled images': how few distinct images were voted
    (a Wilson interval over them at ``z``), and that their own labels shaped the embedding
    they are voted in, which shows as votes surer (or less sure) than the unlabelled
    images'. The estimate moves the held-out accuracy by the difference of the mean vote
    shares, ``unlabelled - held out`` (a vote's share tracks its accuracy), and the
    interval spans both the uncorrected and twice the corrected value, since how closely
    accuracy follows the share is not known: an interval that widens with that difference.
    """
    valid = held_out.valid.astype(jnp.float32)
    n = jnp.sum(valid)
    raw = jnp.sum(held_out.correct) / jnp.maximum(n, 1)
    images = distinct_images(held_out)
    low, high = wilson(raw, images, z)
    held_share = jnp.sum(held_out.share * valid) / jnp.maximum(n, 1)
    shift = jnp.where(n > 0, unlabelled_share - held_share, 0.0)
    return dict(raw=raw, images=images, held_out_share=held_share,
                estimate=jnp.clip(raw + shift, 0, 1),
                low=jnp.clip(low + jnp.minimum(shift, 0.0) * 2, 0, 1),
                high=jnp.clip(high + jnp.maximum(shift, 0.0) * 2, 0, 1))


def share_threshold(held_out: HeldOutVotes, min_precision: float, z: float = 0.0) -> jax.Array:
    """The lowest vote share ``t`` such that the valid held-out votes with share >= t
    are at least ``min_precision`` right; :data:`CLOSED` if no share qualifies. With
    ``z > 0`` the precision's Wilson lower bound must reach it, over the distinct images
    among those votes (their count scaled by the sample's distinct share).

    O(n log n): shares sorted once; for each candidate, the votes at or above it are
    the suffix from its first occurrence (ties counted together).
    """
    share = jnp.where(held_out.valid, held_out.share, -1.0)  # invalid: below every candidate
    order = jnp.argsort(share)
    s = share[order]
    right = (held_out.correct & held_out.valid)[order].astype(jnp.float32)
    first = jnp.searchsorted(s, s, side="left")  # each candidate's first tie
    right_below = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(right)])[first]
    num_above = (s.shape[0] - first).astype(jnp.float32)
    right_above = jnp.sum(right) - right_below
    if z > 0:
        per_vote = distinct_images(held_out) / jnp.maximum(jnp.sum(held_out.valid), 1)
        low, _ = wilson(right_above / jnp.maximum(num_above, 1), num_above * per_vote, z)
        ok = (s >= 0) & (low >= min_precision)
    else:
        ok = (s >= 0) & (right_above >= min_precision * num_above)
    return jnp.min(jnp.where(ok, s, CLOSED))
