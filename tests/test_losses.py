"""Each loss against an independent plain-numpy loop over anchors, pairs and candidates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import losses

TOL = 1e-5


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed, views=4, large=2, b=3, replicas=2, dim=8, m=3):
    rng = np.random.default_rng(seed)
    online = _normalize(rng.normal(size=(views, b, dim)))
    targets = _normalize(rng.normal(size=(large, b * replicas, dim)))
    positives = _normalize(rng.normal(size=(b, m, dim)))
    valid = rng.uniform(size=(b, m)) < 0.6
    valid[0] = False  # one image without any semantic positive
    pos_index = np.arange(b) + b  # this replica holds the second block of the global batch
    return online, targets, positives, valid, pos_index


def _ref_log_softmax(row):
    row = row - row.max()
    return row - np.log(np.exp(row).sum())


def ref_augm(online, targets, pos, pairs, temp, mask=None):
    vals = []
    for u, v in pairs:
        for i in range(online.shape[1]):
            logits = np.array([online[u, i] @ targets[v, j] / temp for j in range(targets.shape[1])])
            if mask is not None:
                logits = np.where(mask[i], logits, -np.inf)
            vals.append(-_ref_log_softmax(logits)[pos[i]])
    return np.mean(vals)


def ref_invariance(online, targets, large_pairs, temp):
    vals = []
    for u, v in large_pairs:
        for i in range(online.shape[1]):
            luv = np.array([online[u, i] @ t / temp for t in targets[v]])
            lvu = np.array([online[v, i] @ t / temp for t in targets[u]])
            puv, pvu = np.exp(_ref_log_softmax(luv)), np.exp(_ref_log_softmax(lvu))
            kl1 = np.sum(pvu * (np.log(pvu) - np.log(puv)))
            kl2 = np.sum(puv * (np.log(puv) - np.log(pvu)))
            vals.append(kl1 + kl2)
    return np.mean(vals)


def ref_sempos(online, targets, positives, valid, pos, pairs, temp, weight=None):
    total, count = 0.0, 0
    for u, v in pairs:
        for i in range(online.shape[1]):
            negs = [np.exp(online[u, i] @ targets[v, j] / temp) for j in range(targets.shape[1]) if j != pos[i]]
            for m in range(positives.shape[1]):
                if not valid[i, m]:
                    continue
                e_pos = np.exp(online[u, i] @ positives[i, m] / temp)
                total += -np.log(e_pos / (e_pos + np.sum(negs))) * (1.0 if weight is None else weight[i])
                count += 1
    return total, count


@pytest.mark.parametrize("same_crop", [False, True])
def test_augmentation_loss_matches_numpy(same_crop):
    online, targets, _, _, pos = _inputs(0)
    pairs = losses.view_pairs(4, 2, same_crop)
    assert ((0, 0) in pairs) == same_crop and (3, 1) in pairs and (1, 1) not in pairs[:0]
    got = losses.augmentation_loss(jnp.asarray(online, jnp.float32), jnp.asarray(targets, jnp.float32),
                                   jnp.asarray(pos), pairs, 0.2)
    np.testing.assert_allclose(got, ref_augm(online, targets, pos, pairs, 0.2), rtol=TOL, atol=TOL)


def test_augmentation_loss_with_sampled_negatives_matches_numpy():
    online, targets, _, _, pos = _inputs(1)
    mask = losses.sample_candidate_mask(jax.random.key(3), jnp.asarray(pos), jnp.asarray(pos), 6, 2)
    mask = np.asarray(mask)
    assert (mask.sum(1) == 3).all() and mask[np.arange(3), pos].all()  # positive + 2 negatives
    pairs = losses.view_pairs(4, 2)
    got = losses.augmentation_loss(jnp.asarray(online, jnp.float32), jnp.asarray(targets, jnp.float32),
                                   jnp.asarray(pos), pairs, 0.1, jnp.asarray(mask))
    np.testing.assert_allclose(got, ref_augm(online, targets, pos, pairs, 0.1, mask), rtol=TOL, atol=TOL)


def test_invariance_penalty_matches_numpy():
    online, targets, _, _, _ = _inputs(2, large=3)
    large_pairs = losses.large_view_pairs(3)
    assert large_pairs == [(0, 1), (0, 2), (1, 2)]
    got = losses.invariance_penalty(jnp.asarray(online, jnp.float32), jnp.asarray(targets, jnp.float32),
                                    large_pairs, 0.3)
    np.testing.assert_allclose(got, ref_invariance(online, targets, large_pairs, 0.3), rtol=1e-4, atol=TOL)


def test_semantic_positive_loss_matches_numpy_and_masks_invalid():
    online, targets, positives, valid, pos = _inputs(3)
    pairs = losses.view_pairs(4, 2)
    total, count = losses.semantic_positive_loss(
        jnp.asarray(online, jnp.float32), jnp.asarray(targets, jnp.float32), jnp.asarray(positives, jnp.float32),
        jnp.asarray(valid), jnp.asarray(pos), pairs, 0.2)
    ref_total, ref_count = ref_sempos(online, targets, positives, valid, pos, pairs, 0.2)
    assert int(count) == ref_count == valid.sum() * len(pairs)
    np.testing.assert_allclose(total, ref_total, rtol=TOL, atol=TOL)
    # Changing an invalid positive changes nothing.
    positives2 = positives.copy()
    positives2[0] = -positives2[0]
    total2, _ = losses.semantic_positive_loss(
        jnp.asarray(online, jnp.float32), jnp.asarray(targets, jnp.float32), jnp.asarray(positives2, jnp.float32),
        jnp.asarray(valid), jnp.asarray(pos), pairs, 0.2)
    assert float(total2) == float(total)


def test_image_weights_scale_the_sum_not_the_count():
    """Unsure images (weight 0) leave the sum; the count, and so the others' weight, stays."""
    online, targets, positives, valid, pos = _inputs(7)
    valid[:] = True
    weight = np.array([1.0, 0.0, 0.5])
    pairs = losses.view_pairs(4, 2)
    total, count = losses.semantic_positive_loss(
        jnp.asarray(online, jnp.float32), jnp.asarray(targets, jnp.float32), jnp.asarray(positives, jnp.float32),
        jnp.asarray(valid), jnp.asarray(pos), pairs, 0.2, weight=jnp.asarray(weight, jnp.float32))
    ref_total, ref_count = ref_sempos(online, targets, positives, valid, pos, pairs, 0.2, weight)
    assert int(count) == ref_count == valid.size * len(pairs)
    np.testing.assert_allclose(total, ref_total, rtol=TOL, atol=TOL)
    unweighted, _ = ref_sempos(online, targets, positives, valid, pos, pairs, 0.2)
    assert ref_total < unweighted - 1.0  # the weights really removed terms


def test_invariance_is_zero_for_identical_views_and_gradient_is_finite():
    online, targets, _, _, _ = _inputs(4, views=2)
    online[1] = online[0]
    targets[1] = targets[0]
    val, grad = jax.value_and_grad(lambda o: losses.invariance_penalty(o, jnp.asarray(targets, jnp.float32),
                                                                       [(0, 1)], 0.2))(jnp.asarray(online, jnp.float32))
    assert abs(float(val)) < 1e-6 and np.isfinite(np.asarray(grad)).all()


def test_one_shared_logits_tensor_gives_all_three_terms():
    """The update step builds the logits once; each term read from it equals its numpy loop."""
    online, targets, positives, valid, pos = _inputs(5)
    pairs, large_pairs = losses.view_pairs(4, 2), losses.large_view_pairs(2)
    o, t = jnp.asarray(online, jnp.float32), jnp.asarray(targets, jnp.float32)
    sh = losses.shared_logits(o, t, jnp.asarray(pos), 0.2)
    np.testing.assert_allclose(losses.augmentation_from(sh, pairs), ref_augm(online, targets, pos, pairs, 0.2),
                               rtol=TOL, atol=TOL)
    np.testing.assert_allclose(losses.invariance_from(sh, large_pairs),
                               ref_invariance(online, targets, large_pairs, 0.2), rtol=1e-4, atol=TOL)
    total, count = losses.semantic_positive_from(sh, o, jnp.asarray(positives, jnp.float32), jnp.asarray(valid),
                                                 pairs, 0.2)
    ref_total, ref_count = ref_sempos(online, targets, positives, valid, pos, pairs, 0.2)
    assert int(count) == ref_count
    np.testing.assert_allclose(total, ref_total, rtol=TOL, atol=TOL)


def test_semantic_loss_gradient_is_finite_when_the_positive_takes_all_mass():
    online, targets, positives, _, pos = _inputs(6, views=2)
    targets[:, pos] = online[0]  # the augmentation positive is the anchor itself: p_own -> 1
    valid = np.ones((3, 3), bool)

    def f(o):
        total, count = losses.semantic_positive_loss(o, jnp.asarray(targets, jnp.float32),
                                                     jnp.asarray(positives, jnp.float32), jnp.asarray(valid),
                                                     jnp.asarray(pos), losses.view_pairs(2, 2), 0.01)
        return total / count

    val, grad = jax.value_and_grad(f)(jnp.asarray(online, jnp.float32))
    assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()
