"""The pseudo-label queue on constructed embeddings where the answer is known."""

import jax
import jax.numpy as jnp
import numpy as np

from semppl_jax import queue as q


def _unit(*vecs):
    v = np.asarray(vecs, np.float32)
    return jnp.asarray(v / np.linalg.norm(v, axis=-1, keepdims=True))


def test_push_fifo_masks_padding_and_wraps_around():
    state = q.init_queue(4, 2)
    emb = jnp.arange(12, dtype=jnp.float32).reshape(6, 2)
    state = q.push(state, emb, jnp.arange(6), jnp.arange(6) + 100, jnp.array([1, 0, 1, 0, 1, 0], bool))
    np.testing.assert_array_equal(state.labels, [0, 2, 4, -1])
    np.testing.assert_array_equal(state.ids, [100, 102, 104, -1])
    assert int(state.pointer) == 3 and float(q.fill_fraction(state)) == 0.75
    # Three more valid rows: slot 3, then wrap to overwrite the two oldest.
    state = q.push(state, emb[:3] + 50, jnp.array([7, 8, 9]), jnp.array([7, 8, 9]), jnp.ones(3, bool))
    np.testing.assert_array_equal(state.labels, [8, 9, 4, 7])
    np.testing.assert_array_equal(state.embeddings[3], emb[0] + 50)
    assert int(state.pointer) == 2


def test_push_block_larger_than_queue_keeps_the_last_entries():
    state = q.init_queue(3, 1)
    state = q.push(state, jnp.zeros((5, 1)), jnp.arange(5), jnp.arange(5), jnp.ones(5, bool))
    assert sorted(np.asarray(state.labels).tolist()) == [2, 3, 4]
    # Same as pushing them one at a time.
    one = q.init_queue(3, 1)
    for i in range(5):
        one = q.push(one, jnp.zeros((1, 1)), jnp.array([i]), jnp.array([i]), jnp.ones(1, bool))
    np.testing.assert_array_equal(one.labels, state.labels)
    assert int(one.pointer) == int(state.pointer)


def _filled(embs, labels, ids=None, size=None):
    size = size or len(labels)
    state = q.init_queue(size, embs.shape[1])
    ids = jnp.arange(len(labels)) if ids is None else jnp.asarray(ids)
    return q.push(state, embs, jnp.asarray(labels), ids, jnp.ones(len(labels), bool))


def test_knn_majority_on_clusters():
    # Class 0 around +x, class 1 around +y.
    embs = _unit([1, 0.1], [1, -0.1], [0.9, 0], [0.1, 1], [-0.1, 1], [0, 0.9])
    state = _filled(embs, [0, 0, 0, 1, 1, 1])
    labels, _ = q.knn_vote(state, _unit([1, 0.05], [0.05, 1], [1, 0.9]), k=3, num_classes=2)
    np.testing.assert_array_equal(labels, [0, 1, 0])


def test_knn_tie_broken_by_summed_similarity():
    # k=2, one neighbour of each class: the closer one wins.
    embs = _unit([1, 0], [0, 1])
    state = _filled(embs, [3, 5])
    labels, _ = q.knn_vote(state, _unit([0.6, 0.8], [0.8, 0.6]), k=2, num_classes=6)
    np.testing.assert_array_equal(labels, [5, 3])
    # A 2-vs-1 majority beats a closer single neighbour.
    state = _filled(_unit([0, 1], [0.2, 1], [1, 0]), [1, 1, 0])
    labels, _ = q.knn_vote(state, _unit([1, 0.3]), k=3, num_classes=2)
    np.testing.assert_array_equal(labels, [1])


def test_knn_on_empty_and_partly_filled_queue():
    state = q.init_queue(8, 2)
    labels, _ = q.knn_vote(state, _unit([1, 0]), k=3, num_classes=4)
    np.testing.assert_array_equal(labels, [-1])
    state = _filled(_unit([1, 0]), [2], size=8)  # 1 entry, k=3: vote of the one valid neighbour
    labels, _ = q.knn_vote(state, _unit([0, 1]), k=3, num_classes=4)
    np.testing.assert_array_equal(labels, [2])


def test_pseudo_label_is_mode_over_views():
    embs = _unit([1, 0], [0, 1])
    state = _filled(embs, [0, 1])
    # 3 views: two near class 1, one near class 0 -> 1. Second image: 2 near 0.
    views = jnp.stack([_unit([0.1, 1], [1, 0.1]), _unit([0.2, 1], [1, 0.2]), _unit([1, 0.1], [0.1, 1])])
    np.testing.assert_array_equal(q.pseudo_labels(state, views, k=1, num_classes=2), [1, 0])
    # Two views that disagree: the view with the more similar neighbour wins.
    views = jnp.stack([_unit([1, 0.9]), _unit([0.1, 1])])
    np.testing.assert_array_equal(q.pseudo_labels(state, views, k=1, num_classes=2), [1])


def test_semantic_positives_share_the_label_and_exclude_own_id():
    embs = _unit([1, 0], [1, 0.1], [0, 1], [0.1, 1], [1, 1])
    state = _filled(embs, [0, 0, 1, 1, 0], ids=[10, 11, 12, 13, 10])
    labels = jnp.array([0, 1, 2, -1])
    ids = jnp.array([10, 12, 99, 98])
    pos, valid = q.sample_positives(jax.random.key(0), state, labels, ids, jnp.arange(4), 64)
    valid = np.asarray(valid)
    assert valid[0].all() and valid[1].all() and not valid[2].any() and not valid[3].any()
    # Image 0 (id 10, label 0): only entry 1 is eligible (entries 0 and 4 are its own).
    np.testing.assert_allclose(pos[0], np.repeat(np.asarray(embs[1:2]), 64, 0), atol=1e-6)
    # Image 1 (id 12, label 1): only entry 3.
    np.testing.assert_allclose(pos[1], np.repeat(np.asarray(embs[3:4]), 64, 0), atol=1e-6)


def test_semantic_positives_are_uniform_over_eligible_entries():
    embs = jnp.eye(4, dtype=jnp.float32)
    state = _filled(embs, [0, 0, 0, 1])
    pos, valid = q.sample_positives(jax.random.key(1), state, jnp.array([0]), jnp.array([99]),
                                    jnp.arange(1), 3000)
    counts = np.asarray(pos[0]).sum(0)
    assert valid.all() and counts[3] == 0
    np.testing.assert_allclose(counts[:3] / 3000, [1 / 3] * 3, atol=0.04)


def _assert_uniform_over_eligible(pos, valid, labels, ids, want, own, m):
    """Brute force: each image's draws land only on entries with its label and another
    id, each such entry about m / (number eligible) times; valid iff one exists."""
    size = len(labels)
    picked = np.argmax(np.asarray(pos), axis=-1)  # one-hot embeddings -> entry index
    for i in range(len(want)):
        eligible = np.flatnonzero((labels == want[i]) & (want[i] >= 0) & (ids != own[i]))
        assert bool(np.asarray(valid)[i].all()) == (len(eligible) > 0)
        if len(eligible):
            assert set(picked[i]) <= set(eligible.tolist())
            counts = np.bincount(picked[i], minlength=size)[eligible]
            expected = m / len(eligible)
            assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 2), (i, counts)


def test_semantic_positives_on_a_random_queue_match_brute_force_eligibility():
    """Many labels, repeated ids (an image's several views), empty slots: every draw is
    eligible, every eligible entry is drawn about equally often, validity is exact."""
    rng = np.random.default_rng(0)
    size, n, m = 300, 40, 400
    labels = rng.integers(0, 6, size)
    labels[-20:] = -1  # empty slots
    ids = rng.integers(0, 60, size)
    state = q.QueueState(embeddings=jnp.eye(size, dtype=jnp.float32), labels=jnp.asarray(labels, jnp.int32),
                         ids=jnp.asarray(ids, jnp.int32), pointer=jnp.zeros((), jnp.int32))
    want = rng.integers(-1, 7, n)  # -1: unlabelled without pseudo-label; 6: no entry has it
    own = rng.integers(0, 60, n)
    pos, valid = q.sample_positives(jax.random.key(2), state, jnp.asarray(want, jnp.int32),
                                    jnp.asarray(own, jnp.int32), jnp.arange(n), m)
    _assert_uniform_over_eligible(pos, valid, labels, ids, want, own, m)


def test_push_keeps_the_label_order_sorted():
    """After any sequence of pushes (padding, empty-label rows, wrap-around, blocks
    larger than the queue) ``by_label`` is a permutation of the slots that sorts the
    labels, empty slots last: what sampling relies on instead of sorting."""
    rng = np.random.default_rng(3)
    for size, block in [(7, 3), (16, 40), (50, 8), (300, 64)]:
        state = q.init_queue(size, 1)
        push = jax.jit(q.push)
        for _ in range(25):
            labels = rng.integers(-1, 6, block)
            state = push(state, jnp.zeros((block, 1)), jnp.asarray(labels), jnp.arange(block),
                         jnp.asarray(rng.random(block) < 0.7))
            order = np.asarray(state.by_label)
            np.testing.assert_array_equal(np.sort(order), np.arange(size))
            keys = np.asarray(state.labels)[order].astype(np.int64)
            keys[keys < 0] = 2**31
            assert np.all(np.diff(keys) >= 0), keys


def test_semantic_positives_from_a_pushed_queue_match_brute_force_eligibility():
    """The same uniformity and exclusion as above on a queue filled by many pushes
    (its label order maintained by merging, not sorted afresh)."""
    rng = np.random.default_rng(4)
    size, n, m = 240, 30, 400
    state = q.init_queue(size, size)
    push = jax.jit(q.push)
    for step in range(12):  # 12 blocks of 32 into 240 slots: wraps around
        slots = (np.arange(32) + 32 * step) % size
        state = push(state, jnp.eye(size, dtype=jnp.float32)[slots], jnp.asarray(rng.integers(0, 5, 32)),
                     jnp.asarray(rng.integers(0, 50, 32)), jnp.ones(32, bool))
    labels, ids = np.asarray(state.labels), np.asarray(state.ids)
    want = rng.integers(-1, 6, n)
    own = rng.integers(0, 50, n)
    pos, valid = q.sample_positives(jax.random.key(5), state, jnp.asarray(want, jnp.int32),
                                    jnp.asarray(own, jnp.int32), jnp.arange(n), m)
    _assert_uniform_over_eligible(pos, valid, labels, ids, want, own, m)


def test_sorted_order_and_no_order_draw_alike():
    """``indexed`` (sorted afresh) and no order at all give the same draws exactly."""
    rng = np.random.default_rng(6)
    size = 64
    state = q.QueueState(embeddings=jnp.eye(size, dtype=jnp.float32),
                         labels=jnp.asarray(rng.integers(-1, 4, size), jnp.int32),
                         ids=jnp.asarray(rng.integers(0, 20, size), jnp.int32), pointer=jnp.zeros((), jnp.int32))
    args = (jnp.asarray(rng.integers(-1, 4, 16), jnp.int32), jnp.asarray(rng.integers(0, 20, 16), jnp.int32),
            jnp.arange(16), 8)
    a = q.sample_positives(jax.random.key(7), state, *args)
    b = q.sample_positives(jax.random.key(7), q.indexed(state), *args)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _loop_vote(emb, labels, ids, queries, own, k, num_classes):
    """A plain loop: per view the k nearest filled entries not of the image itself,
    the view's vote (count, then summed similarity), the mode over views (count, then
    mean winning similarity), and the share, margin and agreement of all neighbours."""
    n_views, n = queries.shape[:2]
    out = []
    for i in range(n):
        view_votes, view_strength, all_labels = [], [], []
        for v in range(n_views):
            cand = [(float(queries[v, i] @ emb[j]), int(labels[j])) for j in range(len(labels))
                    if labels[j] >= 0 and ids[j] != own[i]]
            top = sorted(cand, key=lambda t: -t[0])[:k]
            all_labels += [lab for _, lab in top]
            score = {}
            for sim, lab in top:
                c, s = score.get(lab, (0, 0.0))
                score[lab] = (c + 1, s + sim)
            best = max(score, key=lambda lab: score[lab])
            view_votes.append(best)
            view_strength.append(score[best][1] / score[best][0])
        tally = {}
        for lab, st in zip(view_votes, view_strength):
            c, s = tally.get(lab, (0, 0.0))
            tally[lab] = (c + 1, s + st)
        label = max(tally, key=lambda lab: tally[lab])
        counts = np.bincount(all_labels, minlength=num_classes)
        others = np.delete(counts, label)
        out.append((label, counts[label] / len(all_labels), (counts[label] - others.max()) / len(all_labels),
                    np.mean(np.array(view_votes) == label)))
    return [np.array(x) for x in zip(*out)]


def test_vote_statistics_and_leave_own_out_match_a_loop():
    rng = np.random.default_rng(3)
    size, dim, n, views, classes = 24, 8, 7, 3, 4
    emb = rng.normal(size=(size, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, classes, size).astype(np.int32)
    labels[-4:] = -1  # empty slots
    ids = rng.integers(0, 6, size).astype(np.int32)  # images 0..5 own entries; image 6 owns none
    queries = rng.normal(size=(views, n, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
    own = np.arange(n, dtype=np.int32)
    queue = q.QueueState(jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(ids), jnp.zeros((), jnp.int32))
    for k in (1, 3):
        got = q.vote(queue, jnp.asarray(queries), k, classes, exclude_ids=jnp.asarray(own))
        want = _loop_vote(emb, labels, ids, queries, own, k, classes)
        np.testing.assert_array_equal(np.asarray(got.label), want[0])
        for g, w in zip((got.share, got.margin, got.agreement), want[1:]):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6)
    # Without exclusion an image that owns no entry votes alike; one that does may not.
    plain = q.vote(queue, jnp.asarray(queries), 1, classes)
    left_out = q.vote(queue, jnp.asarray(queries), 1, classes, exclude_ids=jnp.asarray(own))
    assert plain.label[6] == left_out.label[6]
    share, entropy = q.class_occupancy(queue, classes)
    counts = np.bincount(labels[labels >= 0], minlength=classes)
    p = counts / counts.sum()
    assert np.isclose(share, counts.min() * classes / counts.sum())
    assert np.isclose(entropy, -np.sum(p[p > 0] * np.log(p[p > 0])) / np.log(classes))
