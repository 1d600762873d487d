"""The vote-share gate: held-out votes of the queue's labelled images and the
threshold they give, against plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import queue as q
from semppl_jax import vote_gate
from tests.test_queue import _loop_vote


def _pushed_queue(rng, size, dim, views, classes, steps, batch, spread):
    """A queue filled as the step fills it: image-major blocks of each labelled image's
    views, ids recurring across steps (the same image seen in two epochs)."""
    centres = rng.normal(size=(classes, dim))
    queue = q.init_queue(size, dim)
    for s in range(steps):
        label = rng.integers(0, classes, batch)
        ids = (np.arange(batch) + s * batch) % (3 * batch)
        labelled = rng.uniform(size=batch) < 0.6
        emb = centres[label][:, None] + spread * rng.normal(size=(batch, views, dim))
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        queue = q.push(queue, jnp.asarray(emb.reshape(batch * views, dim), jnp.float32),
                       jnp.asarray(np.repeat(np.where(labelled, label, -1), views)),
                       jnp.asarray(np.repeat(ids, views)), jnp.asarray(np.repeat(labelled, views)))
    return queue


@pytest.mark.parametrize("k", [1, 3])
def test_held_out_votes_match_a_loop(k):
    rng = np.random.default_rng(0)
    views, classes = 2, 4
    queue = _pushed_queue(rng, size=40, dim=6, views=views, classes=classes, steps=5, batch=6, spread=0.9)
    slots = jnp.arange(20)
    got = vote_gate.held_out_votes(queue, slots, views, k, classes)
    emb, labels, ids = (np.asarray(x) for x in (queue.embeddings, queue.labels, queue.ids))
    assert 0 < np.sum(labels >= 0) < len(labels)  # some slots are still empty
    filled = [g for g in range(20) if labels[2 * g] >= 0]
    # Each slot is one image's views (what the gate relies on push for).
    for g in filled:
        assert ids[2 * g] == ids[2 * g + 1] and labels[2 * g] == labels[2 * g + 1]
    np.testing.assert_array_equal(np.asarray(got.valid), labels[0::2] >= 0)
    queries = np.stack([emb[[2 * g for g in filled]], emb[[2 * g + 1 for g in filled]]])
    want_label, want_share, _, _ = _loop_vote(emb, labels, ids, queries, ids[[2 * g for g in filled]], k, classes)
    np.testing.assert_allclose(np.asarray(got.share)[filled], want_share, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.correct)[filled], want_label == labels[[2 * g for g in filled]])
    assert not np.any(np.asarray(got.correct)[~np.asarray(got.valid)])
    assert 0 < np.mean(np.asarray(got.correct)[filled]) < 1  # both outcomes are exercised


def _loop_threshold(share, correct, valid, precision):
    for t in sorted(set(share[valid])):
        above = valid & (share >= t)
        if np.sum(correct & above) >= precision * np.sum(above):
            return t
    return vote_gate.CLOSED


def test_threshold_matches_a_loop():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = 40
        share = rng.integers(0, 9, n) / 8.0  # shares come in steps of 1 / (L k): ties
        valid = rng.uniform(size=n) < rng.uniform(0.05, 1.0)
        correct = valid & (rng.uniform(size=n) < share ** rng.uniform(0.3, 3.0))
        precision = float(rng.choice([0.5, 0.8, 0.9, 1.0]))
        got = vote_gate.share_threshold(vote_gate.HeldOutVotes(
            jnp.asarray(share, jnp.float32), jnp.asarray(correct), jnp.asarray(valid),
            jnp.asarray(np.where(valid, np.arange(n), -1))), precision)
        assert float(got) == _loop_threshold(share, correct, valid, precision), trial


def _wilson_low(p, n, z):
    return (p + z * z / (2 * n) - z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def test_wilson_interval_against_published_values():
    """5 of 10 at 95%: (0.2366, 0.7634); 0 of 10: (0, 0.2775); 10 of 10: (0.7225, 1) (Newcombe 1998)."""
    for right, want in ((5, (0.2366, 0.7634)), (0, (0.0, 0.2775)), (10, (0.7225, 1.0))):
        low, high = vote_gate.wilson(jnp.asarray(right / 10), jnp.asarray(10.0), 1.96)
        np.testing.assert_allclose([float(low), float(high)], want, atol=1e-4)
    assert [float(v) for v in vote_gate.wilson(jnp.asarray(0.7), jnp.asarray(0.0), 1.96)] == [0.0, 1.0]


def test_distinct_images_and_the_cautious_threshold_match_loops():
    rng = np.random.default_rng(4)
    for trial in range(200):
        n = 40
        share = rng.integers(0, 9, n) / 8.0
        valid = rng.uniform(size=n) < rng.uniform(0.2, 1.0)
        image = np.where(valid, rng.integers(0, rng.integers(2, 30), n), -1)  # repeats: drawn with replacement
        correct = valid & (rng.uniform(size=n) < share ** rng.uniform(0.3, 3.0))
        votes = vote_gate.HeldOutVotes(jnp.asarray(share, jnp.float32), jnp.asarray(correct), jnp.asarray(valid),
                                       jnp.asarray(image, jnp.int32))
        distinct = len(set(image[valid]))
        assert float(vote_gate.distinct_images(votes)) == distinct
        precision, z = float(rng.choice([0.5, 0.8, 0.9])), float(rng.choice([0.84, 1.64]))
        want = vote_gate.CLOSED
        for t in sorted(set(share[valid])):
            above = valid & (share >= t)
            p = np.sum(correct & above) / np.sum(above)
            if _wilson_low(p, np.sum(above) * distinct / max(valid.sum(), 1), z) >= precision:
                want = t
                break
        got = float(vote_gate.share_threshold(votes, precision, z))
        assert got == pytest.approx(want), trial


def test_few_distinct_images_keep_the_cautious_gate_shut():
    """Four images, each voted right many times: the point estimate (precision 1) opens the
    gate; 80% sure of 90% precision needs at least seven such images."""
    for images, opens in ((4, False), (7, True)):
        n = 64
        votes = vote_gate.HeldOutVotes(jnp.full(n, 0.75), jnp.ones(n, bool), jnp.ones(n, bool),
                                       jnp.arange(n, dtype=jnp.int32) % images)
        assert float(vote_gate.share_threshold(votes, 0.9)) == 0.75
        assert (float(vote_gate.share_threshold(votes, 0.9, z=0.8416)) == 0.75) == opens


def test_one_labelled_image_a_class_closes_the_gate_and_clean_classes_open_it():
    """With no other entry of its class, every held-out vote is wrong: the gate closes.
    With several images a class in tight clusters, every vote is right: it opens fully."""
    rng = np.random.default_rng(2)
    dim, classes, views = 8, 4, 2
    centres = np.eye(dim)[:classes]

    def queue_of(images_per_class):
        labels = np.repeat(np.arange(classes), images_per_class * views)
        ids = np.repeat(np.arange(classes * images_per_class), views)
        emb = centres[labels] + 0.05 * rng.normal(size=(len(labels), dim))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return q.QueueState(jnp.asarray(emb, jnp.float32), jnp.asarray(labels, jnp.int32),
                            jnp.asarray(ids, jnp.int32), jnp.zeros((), jnp.int32))

    slots = vote_gate.sample_images(jax.random.key(0), classes * views, views, 64)
    one = vote_gate.held_out_votes(queue_of(1), slots, views, 3, classes)
    assert np.all(np.asarray(one.valid)) and not np.any(np.asarray(one.correct))
    assert float(vote_gate.share_threshold(one, 0.9)) == vote_gate.CLOSED
    queue = queue_of(4)
    slots = vote_gate.sample_images(jax.random.key(0), 4 * classes * views, views, 64)
    many = vote_gate.held_out_votes(queue, slots, views, 3, classes)
    assert np.all(np.asarray(many.correct)) and np.all(np.asarray(many.share) == 1.0)
    assert float(vote_gate.share_threshold(many, 0.9)) == 1.0  # every share is 1: the gate passes 1


def test_sampled_slots_cover_the_queue_uniformly():
    slots = np.asarray(vote_gate.sample_images(jax.random.key(3), 40, 2, 20_000))
    counts = np.bincount(slots, minlength=20)
    assert slots.min() == 0 and slots.max() == 19
    assert np.all(np.abs(counts / 1000 - 1) < 0.15)


def test_the_estimate_moves_by_the_share_gap_and_its_interval_spans_the_correction():
    """40 distinct images, 30 right, voted with a mean share of 0.6; unlabelled votes at 0.7:
    estimate 0.75 + 0.1; the interval from Wilson's low end to its high end + 2 x 0.1."""
    n = 40
    votes = vote_gate.HeldOutVotes(jnp.full(n, 0.6), jnp.arange(n) < 30, jnp.ones(n, bool), jnp.arange(n))
    got = {k: float(v) for k, v in vote_gate.pseudo_label_estimate(votes, jnp.asarray(0.7)).items()}
    low, high = _wilson_low(0.75, 40, 1.96), 1 - _wilson_low(0.25, 40, 1.96)
    assert got["raw"] == 0.75 and got["images"] == 40 and got["held_out_share"] == pytest.approx(0.6)
    assert got["estimate"] == pytest.approx(0.85, abs=1e-6)
    assert got["low"] == pytest.approx(low, abs=1e-5) and got["high"] == pytest.approx(min(1, high + 0.2), abs=1e-5)
    lower = {k: float(v) for k, v in vote_gate.pseudo_label_estimate(votes, jnp.asarray(0.5)).items()}
    assert lower["estimate"] == pytest.approx(0.65, abs=1e-6) and lower["low"] == pytest.approx(low - 0.2, abs=1e-5)
    assert lower["high"] == pytest.approx(high, abs=1e-5)
