"""SemPPL's loss terms, per replica, on already-gathered target candidates.

Shapes: ``online`` is ``[V, b, D]`` (normalised online predictions of every
view; the first L are the large views), ``targets`` is ``[L, B, D]`` (normalised
target projections of the large views of the *global* batch), ``positive_index``
``[b]`` is each local image's row in ``targets``, ``candidate_mask`` ``[b, B]``
marks which candidates an anchor may see (all, or sampled negatives + itself).
Every loss is a mean (or a sum and a count, where the count is data-dependent
and must be normalised globally by the caller).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e9  # finite, so that masked softmaxes never produce NaN gradients


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps))


def view_pairs(num_views: int, num_large: int, same_crop: bool = False) -> list[tuple[int, int]]:
    """Ordered (anchor view u, target view v) pairs: u any view, v a large one."""
    return [(u, v) for u in range(num_views) for v in range(num_large) if same_crop or u != v]


def large_view_pairs(num_large: int) -> list[tuple[int, int]]:
    """Unordered pairs {u, v} of distinct large views, for the invariance penalty."""
    return [(u, v) for u in range(num_large) for v in range(u + 1, num_large)]


def pair_weights(pairs: Sequence[tuple[int, int]], num_views: int, num_large: int) -> np.ndarray:
    """[V, L] 0/1 matrix of the (u, v) pairs that enter a loss (a trace-time constant)."""
    w = np.zeros((num_views, num_large), np.float32)
    for u, v in pairs:
        w[u, v] = 1.0
    return w


def all_logits(online: jax.Array, targets: jax.Array, temperature: float,
               candidate_mask: jax.Array | None) -> jax.Array:
    """Similarities of every view's predictions to every large view's candidates:
    ``[V, L, b, B]``; candidates an anchor may not see get ``NEG_INF``."""
    logits = jnp.einsum("ubd,vjd->uvbj", online, targets) / temperature
    if candidate_mask is not None:
        logits = jnp.where(candidate_mask[None, None], logits, NEG_INF)
    return logits


class SharedLogits(NamedTuple):
    """One similarity tensor per step, shared by the three loss terms."""

    log_p: jax.Array  # [V, L, b, B] log-softmax over the candidates an anchor may see
    lse: jax.Array  # [V, L, b] their log-sum-exp (the softmax normaliser)
    own_log_p: jax.Array  # [V, L, b] log-probability of the augmentation positive


def shared_logits(online: jax.Array, targets: jax.Array, positive_index: jax.Array, temperature: float,
                  candidate_mask: jax.Array | None = None) -> SharedLogits:
    logits = all_logits(online, targets, temperature, candidate_mask)
    lse = jax.nn.logsumexp(logits, axis=-1)
    log_p = logits - lse[..., None]
    own = jnp.take_along_axis(log_p, positive_index[None, None, :, None], axis=-1)[..., 0]
    return SharedLogits(log_p, lse, own)


def augmentation_from(sh: SharedLogits, pairs: Sequence[tuple[int, int]]) -> jax.Array:
    """InfoNCE: each view's prediction must pick its own image among the targets."""
    num_views, num_large, b = sh.own_log_p.shape
    w = pair_weights(pairs, num_views, num_large)
    return -jnp.sum(sh.own_log_p * w[:, :, None]) / (w.sum() * b)


def invariance_from(sh: SharedLogits, large_pairs: Sequence[tuple[int, int]]) -> jax.Array:
    """ReLIC's symmetric KL between the similarity distributions of two large views:
    ``KL(sg(p^vu) || p^uv) + KL(sg(p^uv) || p^vu)``, averaged over pairs and images."""
    num_large, b = sh.log_p.shape[1], sh.log_p.shape[2]
    if not large_pairs:
        return jnp.zeros((), sh.log_p.dtype)
    log_p = sh.log_p[:num_large]
    log_p_swapped = jax.lax.stop_gradient(jnp.swapaxes(log_p, 0, 1))  # [u, v] <- p^{vu}
    kl = jnp.sum(jnp.exp(log_p_swapped) * (log_p_swapped - log_p), axis=-1)  # [L, L, b]
    w = pair_weights(large_pairs, num_large, num_large)
    w = w + w.T  # both directions of each unordered pair
    return jnp.sum(kl * w[:, :, None]) / (len(large_pairs) * b)


# The negatives' log-sum-exp is lse + log(1 - p_own); p_own is capped so that an
# anchor whose positive takes all the mass (p_own -> 1) keeps a finite gradient.
MAX_OWN_P = 1.0 - 2.0 ** -20


def semantic_positive_from(sh: SharedLogits, online: jax.Array, positives: jax.Array,
                           positive_valid: jax.Array, pairs: Sequence[tuple[int, int]],
                           temperature: float, weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """InfoNCE with a semantic positive in place of the augmentation positive; the
    negatives are the same candidates minus the augmentation positive.

    ``positives`` ``[b, M, D]`` with ``positive_valid`` ``[b, M]``. Returns the sum
    of the loss over valid (image, positive, pair) triples and their count: the
    caller divides by the *global* count so that the mean is over the global batch.
    ``weight`` ``[b]`` scales each image's triples in the sum only, not in the count:
    an image weighted 0 (an unsure pseudo-label) drops out without raising the weight
    of the others, so the term shrinks with the share of images that keep it.
    """
    num_views, num_large = sh.lse.shape[:2]
    neg_lse = sh.lse + jnp.log1p(-jnp.minimum(jnp.exp(sh.own_log_p), MAX_OWN_P))  # [V, L, b]
    pos_logits = jnp.einsum("ubd,bmd->ubm", online, positives) / temperature  # [V, b, M]
    loss = jnp.logaddexp(pos_logits[:, None], neg_lse[..., None]) - pos_logits[:, None]  # [V, L, b, M]
    w = pair_weights(pairs, num_views, num_large)
    per_positive = positive_valid.astype(loss.dtype)
    if weight is not None:
        per_positive = per_positive * weight[:, None].astype(loss.dtype)
    total = jnp.sum(loss * w[:, :, None, None] * per_positive[None, None])
    count = jnp.sum(positive_valid).astype(online.dtype) * w.sum()
    return total, count


def augmentation_loss(online: jax.Array, targets: jax.Array, positive_index: jax.Array,
                      pairs: Sequence[tuple[int, int]], temperature: float,
                      candidate_mask: jax.Array | None = None) -> jax.Array:
    """``augmentation_from`` on freshly built logits (for callers that need this term alone)."""
    return augmentation_from(shared_logits(online, targets, positive_index, temperature, candidate_mask), pairs)


def invariance_penalty(online: jax.Array, targets: jax.Array, large_pairs: Sequence[tuple[int, int]],
                       temperature: float, candidate_mask: jax.Array | None = None) -> jax.Array:
    """``invariance_from`` on freshly built logits (the positive index plays no part)."""
    num_large = targets.shape[0]
    zero = jnp.zeros((online.shape[1],), jnp.int32)
    return invariance_from(shared_logits(online[:num_large], targets, zero, temperature, candidate_mask),
                           large_pairs)


def semantic_positive_loss(online: jax.Array, targets: jax.Array, positives: jax.Array,
                           positive_valid: jax.Array, positive_index: jax.Array,
                           pairs: Sequence[tuple[int, int]], temperature: float,
                           candidate_mask: jax.Array | None = None, weight: jax.Array | None = None
                           ) -> tuple[jax.Array, jax.Array]:
    """``semantic_positive_from`` on freshly built logits."""
    sh = shared_logits(online, targets, positive_index, temperature, candidate_mask)
    return semantic_positive_from(sh, online, positives, positive_valid, pairs, temperature, weight)


def sample_candidate_mask(key: jax.Array, global_index: jax.Array, positive_index: jax.Array,
                          num_candidates: int, num_negatives: int | None) -> jax.Array | None:
    """Which candidates each anchor sees: all (None) or its positive + ``num_negatives``.

    Keys are folded with each image's global index, so the draw of an image does
    not depend on how the batch is sharded over devices.
    """
    if num_negatives is None or num_negatives >= num_candidates - 1:
        return None

    def one(idx: jax.Array, pos: jax.Array) -> jax.Array:
        scores = jax.random.uniform(jax.random.fold_in(key, idx), (num_candidates,))
        scores = scores.at[pos].set(-1.0)  # never pick the positive as a negative
        _, chosen = jax.lax.top_k(scores, num_negatives)
        mask = jnp.zeros((num_candidates,), bool).at[chosen].set(True)
        return mask.at[pos].set(True)

    return jax.vmap(one)(global_index, positive_index)
