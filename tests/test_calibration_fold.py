"""The calibration fold (``dataset.calibration_per_class``): labelled images kept out of the
loss, voted like the unlabelled ones, whose accuracy over about an epoch is the logged
estimate of the pseudo-labels' accuracy, with a Wilson interval over the fold's images."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import tiny
from semppl_jax import datasets, input_pipeline, jobs, label_subsets
from semppl_jax import periodic_actions as pa
from tests.test_input_pipeline import small_views, take
from tests.test_own_data import own_folder


def test_the_fold_draws_from_each_classs_labelled_images_and_leaves_one_in_the_loss():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 3, 300)
    labelled = (labels >= 0) & (rng.random(300) < 0.2)
    fold = label_subsets.calibration_fold(labels, labelled, 2, seed=5)
    assert not (fold & ~labelled).any()
    assert np.bincount(labels[fold], minlength=3).tolist() == [2, 2, 2]
    np.testing.assert_array_equal(fold, label_subsets.calibration_fold(labels, labelled, 2, seed=5))
    assert (fold != label_subsets.calibration_fold(labels, labelled, 2, seed=6)).any()
    assert not label_subsets.calibration_fold(labels, labelled, 0, seed=5).any()
    few = np.array([0] * 5 + [1] * 2 + [2] * 5)
    with pytest.raises(ValueError, match="class 'b' has 2 labelled images, and at least one must stay"):
        label_subsets.calibration_fold(few, np.ones(12, bool), 2, 5, class_names=("a", "b", "c"))


def test_the_fold_is_voted_as_unlabelled_and_is_all_the_monitors_score(tmp_path):
    """Half of a fully labelled folder labelled, one image a class in the fold: the fold's
    images enter as unlabelled; the monitors' ``true_label`` is kept for them alone."""
    root = own_folder(tmp_path / "own", labelled_per_class=8, unlabelled_per_class=0)
    config = small_views(tiny.get_config())
    config.dataset.update(dict(name=f"folder:{root}", label_subset="0.5", calibration_per_class=1))
    source = datasets.load_split(config, "train")
    labelled, fold = datasets.pretraining_masks(config, source)
    np.testing.assert_array_equal(labelled | fold, datasets.config_labelled_mask(config, source))
    assert fold.sum() == 3 and labelled.sum() == 9 and not (labelled & fold).any()
    batches = take(input_pipeline.train_dataset(source, labelled, config, 8, 0, calibration=fold), 3)
    for b in batches:
        ids = b["image_id"]
        np.testing.assert_array_equal(b["is_labelled"], labelled[ids])
        np.testing.assert_array_equal(b["label"], np.where(labelled[ids], source.labels[ids], -1))
        np.testing.assert_array_equal(b["true_label"], np.where(labelled[ids] | fold[ids], source.labels[ids], -1))
    assert sorted(np.concatenate([b["image_id"] for b in batches]).tolist()) == list(range(24))


def wilson_reference(p: float, n: float, z: float) -> tuple[float, float]:
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


ESTIMATE = {"calibration_images", "pseudo_label_accuracy_estimate", "pseudo_label_accuracy_low",
            "pseudo_label_accuracy_high"}


def test_the_estimate_covers_about_the_last_epoch_with_wilsons_interval():
    action = pa.CalibrationFold(fold_size=10, steps_per_epoch=4)
    right_voted = [(1, 2), (0, 1), (2, 2), (1, 3), (0, 0), (3, 3), (2, 4), (1, 1)]  # a step each
    logged = {}
    for step, (right, voted) in enumerate(right_voted, 1):
        batch_scores = dict(pseudo_label_accuracy=1.0, probe_accuracy=0.5, sure_pseudo_label_accuracy=1.0, loss=2.0)
        report = pa.Report(step, None, dict(hidden_labels_right=jnp.float32(right), hidden_labels=jnp.float32(voted)),
                           batch_scores if step % 2 == 0 else None)  # a log every 2 steps
        action(report)
        if report.scalars is not None:
            logged[step] = report.scalars
            assert set(report.scalars) - ESTIMATE == {"loss"}  # the batch's few fold images: not logged
    for step in (4, 6, 8):  # the last two log intervals: 4 steps, an epoch
        right, voted = np.sum(right_voted[step - 4:step], 0)
        low, high = wilson_reference(right / voted, min(voted, 10), 1.96)
        assert logged[step]["calibration_images"] == min(voted, 10)
        np.testing.assert_allclose([logged[step][k] for k in ("pseudo_label_accuracy_estimate",
                                                               "pseudo_label_accuracy_low",
                                                               "pseudo_label_accuracy_high")],
                                   [right / voted, low, high], rtol=1e-5)
    assert logged[2]["calibration_images"] == 3  # the first interval alone
    assert pa.calibration_estimate(0, 0, 10) == dict(calibration_images=0.0)  # nothing voted yet: the queue's


def test_a_run_with_a_fold_logs_the_folds_estimate(tmp_path):
    root = own_folder(tmp_path / "own", labelled_per_class=3, unlabelled_per_class=5)
    config = tiny.get_config()
    config.dataset.update(dict(name=f"folder:{root}", label_subset="1.0", calibration_per_class=1))
    config.views.update(dict(large_size=24, small_size=12))
    config.training.update(dict(batch_size=8, num_steps=6, log_every_steps=3, checkpoint_every_steps=100))
    config.semppl.queue_size = 16
    jobs.train(config, str(tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    last = rows[-1]  # 6 steps of 8 = 2 epochs of 24 images: the fold's 3 images voted in the last one
    assert last["calibration_images"] == 3 and "hidden_labels_right" not in last
    scored_on_a_batchs_fold_images = {"pseudo_label_accuracy", "probe_accuracy", "sure_pseudo_label_accuracy"}
    assert not scored_on_a_batchs_fold_images & set().union(*rows)  # the estimate is the fold's measure
    assert last["pseudo_label_accuracy_estimate"] in (0.0, 1 / 3, 2 / 3, 1.0)
    low, high = wilson_reference(last["pseudo_label_accuracy_estimate"], 3, 1.96)
    assert math.isclose(last["pseudo_label_accuracy_low"], low, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(last["pseudo_label_accuracy_high"], high, rel_tol=1e-5, abs_tol=1e-6)
