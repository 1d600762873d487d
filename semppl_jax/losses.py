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


def augmentation_loss(online: jax.Array, targets: jax.Array, positive_index: jax.Array,
                      pairs: Sequence[tuple[int, int]], temperature: float,
                      candidate_mask: jax.Array | None = None) -> jax.Array:
    """InfoNCE: each view's prediction must pick its own image among the targets."""
    w = pair_weights(pairs, online.shape[0], targets.shape[0])
    log_p = jax.nn.log_softmax(all_logits(online, targets, temperature, candidate_mask), axis=-1)
    nll = -jnp.take_along_axis(log_p, positive_index[None, None, :, None], axis=-1)[..., 0]  # [V, L, b]
    return jnp.sum(nll * w[:, :, None]) / (w.sum() * online.shape[1])


def invariance_penalty(online: jax.Array, targets: jax.Array, large_pairs: Sequence[tuple[int, int]],
                       temperature: float, candidate_mask: jax.Array | None = None) -> jax.Array:
    """ReLIC's symmetric KL between the similarity distributions of two large views:
    ``KL(sg(p^vu) || p^uv) + KL(sg(p^uv) || p^vu)``, averaged over pairs and images."""
    if not large_pairs:
        return jnp.zeros((), online.dtype)
    num_large = targets.shape[0]
    log_p = jax.nn.log_softmax(all_logits(online[:num_large], targets, temperature, candidate_mask), -1)
    log_p_swapped = jax.lax.stop_gradient(jnp.swapaxes(log_p, 0, 1))  # [u, v] <- p^{vu}
    kl = jnp.sum(jnp.exp(log_p_swapped) * (log_p_swapped - log_p), axis=-1)  # [L, L, b]
    w = pair_weights(large_pairs, num_large, num_large)
    w = w + w.T  # both directions of each unordered pair
    return jnp.sum(kl * w[:, :, None]) / (len(large_pairs) * online.shape[1])


def semantic_positive_loss(online: jax.Array, targets: jax.Array, positives: jax.Array,
                           positive_valid: jax.Array, positive_index: jax.Array,
                           pairs: Sequence[tuple[int, int]], temperature: float,
                           candidate_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """InfoNCE with a semantic positive in place of the augmentation positive.

    ``positives`` ``[b, M, D]`` with ``positive_valid`` ``[b, M]``. Returns the sum
    of the loss over valid (image, positive, pair) triples and their count: the
    caller divides by the *global* count so that the mean is over the global batch.
    """
    own = jax.nn.one_hot(positive_index, targets.shape[1], dtype=bool)  # [b, B]
    negative_mask = ~own if candidate_mask is None else (candidate_mask & ~own)
    neg_lse = jax.nn.logsumexp(all_logits(online, targets, temperature, negative_mask), axis=-1)  # [V, L, b]
    pos_logits = jnp.einsum("ubd,bmd->ubm", online, positives) / temperature  # [V, b, M]
    loss = jnp.logaddexp(pos_logits[:, None], neg_lse[..., None]) - pos_logits[:, None]  # [V, L, b, M]
    w = pair_weights(pairs, online.shape[0], targets.shape[0])
    total = jnp.sum(loss * w[:, :, None, None] * positive_valid[None, None])
    count = jnp.sum(positive_valid).astype(online.dtype) * w.sum()
    return total, count


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
