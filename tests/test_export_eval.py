"""Released-format export/import, and the evaluation protocols' arithmetic."""

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import eval as eval_presets
from experiments import tiny
from semppl_jax import datasets, evaluation, export, sharding, update_step
from tests.conftest import TEST_DATA

MANIFEST = TEST_DATA / "official_param_manifest.json"  # a copy of the released manifest


def released_shaped_state():
    """The tiny ResNet with the released heads (4096/256) and a 1000-class probe."""
    config = tiny.get_config()
    config.model.update(projector_hidden_size=4096, predictor_hidden_size=4096, projection_size=256)
    return config, update_step.init_state(config, jax.random.key(0), 1000, 10, 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config, state = released_shaped_state()
    path = export.export_pretrain_pkl(state, str(tmp_path_factory.mktemp("export")))
    return config, state, path


def test_export_matches_manifest_and_format(exported):
    _, _, path = exported
    with open(path, "rb") as f:
        payload = pickle.load(f)
    exp = payload["experiment_state"]
    assert set(exp) >= {"online_params", "online_state", "target_params", "target_state"}
    assert isinstance(payload["step"], int)
    manifest = json.loads(MANIFEST.read_text())["TinyResNet_1x"]
    params = {f"{m}/{n}": list(v.shape[1:]) for m, d in exp["online_params"].items() for n, v in d.items()}
    state = {f"{m}/{n}": [list(v.shape[1:]), str(v.dtype)] for m, d in exp["online_state"].items()
             for n, v in d.items()}
    assert params == manifest["params"] and state == manifest["state"]
    for tree in exp.values():
        for d in tree.values():
            for v in d.values():
                assert type(v) is np.ndarray and v.shape[0] == 1  # plain numpy, replica axis of 1


def test_export_import_round_trip_is_bit_exact(exported):
    _, state, path = exported
    params, net_state, step = export.load_pretrain_pkl(path)
    assert step == 0
    for ours, theirs in ((state.online_params, params), (state.online_state, net_state)):
        flat_a, flat_b = jax.tree.leaves_with_path(ours), jax.tree.leaves_with_path(theirs)
        assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
        for (_, a), (_, b) in zip(flat_a, flat_b):
            assert np.asarray(a).dtype == b.dtype and np.array_equal(np.asarray(a), b)


def test_corrupt_truncated_and_missing_files_give_clear_errors(exported, tmp_path):
    _, _, path = exported
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        export.load_pretrain_pkl(str(truncated))
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        export.load_pretrain_pkl(str(garbage))
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"params": {}}))
    with pytest.raises(ValueError, match="experiment_state"):
        export.load_pretrain_pkl(str(wrong))
    with pytest.raises(FileNotFoundError):
        export.load_pretrain_pkl(str(tmp_path / "nowhere" / "pretrain.pkl"))


class RunsACommand:
    """Unpickling this calls ``os.system`` (what a malicious pickle does)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_a_command_is_refused_unrun(exported, tmp_path):
    marker = tmp_path / "ran"
    payload = {"experiment_state": {"online_params": RunsACommand(str(marker)), "online_state": {}}, "step": 1}
    evil = tmp_path / "pretrain.pkl"
    evil.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="refused unread: it asks to load (posix|os).system"):
        export.load_pretrain_pkl(str(evil))
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the same bytes do run the command when unpickled plainly
    assert marker.exists()


def test_evaluation_starts_from_a_released_pickle(exported):
    config, state, path = exported
    pretrained = evaluation.load_pretrained(path, config)
    pre_params, pre_state = pretrained.params, pretrained.state
    assert pretrained.step == int(state.step) and pretrained.source == path
    net = evaluation.make_classifier(config.model, 10, None)
    params, net_state = net.init(jax.random.key(5), jnp.zeros((2, 32, 32, 3)), True)
    params, net_state = evaluation.transplant(params, net_state, pre_params, pre_state)
    conv = "tiny_res_net/~/initial_conv"
    np.testing.assert_array_equal(params[conv]["w"], state.online_params[conv]["w"])
    assert params[evaluation.HEAD]["w"].shape == (8, 10)
    other = tiny.get_config()
    other.model.depth = "resnet18"
    net18 = evaluation.make_classifier(other.model, 10, None)
    p18, s18 = jax.eval_shape(lambda: net18.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), True))
    with pytest.raises(ValueError, match="different architecture"):
        evaluation.transplant(p18, s18, pre_params, pre_state)


def test_weighted_knn_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    train, train_y = rng.normal(size=(50, 6)), rng.integers(0, 4, 50)
    test = rng.normal(size=(7, 6))
    scores = evaluation.knn_classify(train, train_y, test, 4, k=5, temperature=0.1, chunk=3)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    for i, q in enumerate(unit(test)):
        sims = unit(train) @ q
        ref = np.zeros(4)
        for j in np.argsort(-sims)[:5]:
            ref[train_y[j]] += np.exp(sims[j] / 0.1)
        np.testing.assert_allclose(scores[i], ref, rtol=1e-5)


def test_every_test_example_counted_once_on_eight_devices():
    """70 test images, batches of 16 over 8 devices: the padded tail is masked."""
    config = eval_presets.get_config("knn,tiny")
    config.eval.batch_size = 16
    source = datasets.load_source("synthetic", "test", synthetic_size=280)
    assert source.num_examples == 70
    mesh = sharding.make_mesh()
    net = evaluation.make_classifier(config.model, 10, None)
    params, net_state = net.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), True)
    params, net_state = sharding.replicate((params, net_state), mesh)
    result = evaluation.test_accuracy(net, params, net_state, source, config, mesh)
    assert result["num_examples"] == 70
    emb, labels = evaluation.embed(net, params, net_state, source, config, mesh)
    assert emb.shape[0] == 70 and np.array_equal(np.sort(labels), np.sort(source.labels))
    # Top-1 by hand from the gathered embeddings and the head equals the sharded count.
    head = jax.device_get(params)[evaluation.HEAD]
    logits = emb @ np.asarray(head["w"]) + np.asarray(head["b"])
    assert result["top1"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels), abs=1e-9)


def test_pseudo_labels_cover_every_unlabelled_image_once_least_confident_first(tmp_path):
    """From a pretrained workdir: one row per unlabelled image (never a labelled one, the
    calibration fold's included), sorted by vote share; the label is the k-NN evaluation's
    vote; accuracy by bucket where the hidden labels exist, with its plot; the fold voted by
    the other labelled images, its Wilson interval by formula."""
    from semppl_jax import jobs, pseudo_labels
    from semppl_jax.metric_writers import read_jsonl

    config = tiny.get_config()
    config.training.num_steps = 2
    config.dataset.calibration_per_class = 1
    workdir = str(tmp_path / "run")
    jobs.train(config, workdir)
    summary = pseudo_labels.write_pseudo_labels(config, workdir)
    rows = read_jsonl(f"{workdir}/pseudo_labels.jsonl")
    source = datasets.load_split(config, "train")
    labelled = datasets.config_labelled_mask(config, source)
    assert sorted(r["image_id"] for r in rows) == np.flatnonzero(~labelled).tolist()
    shares = [r["vote_share"] for r in rows]
    assert shares == sorted(shares) and all(0 < s <= 1 for s in shares)
    assert all(-1e-6 <= r["margin"] <= r["vote_share"] + 1e-6 for r in rows)
    correct = np.mean([r["pseudo_label"] == r["hidden_label"] for r in rows])
    assert summary["images"] == len(rows) and np.isclose(summary["accuracy"], correct)
    assert sum(b["images"] for b in summary["reliability"]) == len(rows)

    # The same vote from the evaluation's own pieces, for a few rows.
    pre = evaluation.load_pretrained(workdir, config)
    net = evaluation.make_classifier(config.model, 10, None)
    params, state = net.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), True)
    mesh = sharding.make_mesh()
    params, state = sharding.replicate(evaluation.transplant(params, state, pre.params, pre.state), mesh)
    in_loss, fold = datasets.pretraining_masks(config, source)
    assert fold.sum() == 10 and np.array_equal(in_loss | fold, labelled)
    rest, rest_y = evaluation.embed(net, params, state, source, config, mesh, ids=np.flatnonzero(in_loss))
    held, held_y = evaluation.embed(net, params, state, source, config, mesh, ids=np.flatnonzero(fold))
    sup, sup_y = np.concatenate([rest, held]), np.concatenate([rest_y, held_y])  # every labelled image
    some = np.array(sorted(r["image_id"] for r in rows[:5]))
    emb, _ = evaluation.embed(net, params, state, source, config, mesh, ids=some)
    want = np.argmax(evaluation.knn_classify(sup, sup_y, emb, 10, config.eval.knn_k, config.eval.knn_temperature), 1)
    got = {r["image_id"]: r["pseudo_label"] for r in rows}
    assert [got[i] for i in some] == want.tolist()

    right = np.argmax(evaluation.knn_classify(rest, rest_y, held, 10, config.eval.knn_k,
                                              config.eval.knn_temperature), 1) == held_y
    p, n, z = right.mean(), 10, 1.96
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    assert summary["calibration_images"] == 10 and summary["accuracy_estimate"] == pytest.approx(p)
    assert (summary["accuracy_low"], summary["accuracy_high"]) == pytest.approx(
        (max(0.0, centre - half), min(1.0, centre + half)), abs=1e-6)

    # Another fold than the run kept out of its loss is refused, naming the field.
    from semppl_jax.errors import ConfigError

    trained = json.loads((tmp_path / "run" / "config.json").read_text())
    trained["dataset"]["calibration_per_class"] = 0
    (tmp_path / "run" / "config.json").write_text(json.dumps(trained))
    with pytest.raises(ConfigError, match=r"config.dataset.calibration_per_class: 1 here, 0 in the pretraining run"):
        pseudo_labels.write_pseudo_labels(config, workdir)
    assert not pseudo_labels.fold_as_trained(config, str(tmp_path / "released" / "pretrain.pkl"))  # no config.json

    by_class = open(f"{workdir}/pseudo_labels_by_class.csv").read().splitlines()
    assert by_class[0] == "label,class_name,images,mean_share,mean_margin,accuracy" and len(by_class) == 11
    assert (tmp_path / "run" / "pseudo_labels_reliability.png").stat().st_size > 1000
    header = open(f"{workdir}/pseudo_labels.csv").readline().strip()
    assert header == "file_name,image_id,pseudo_label,class_name,vote_share,margin,hidden_label"


def test_vote_confidence_is_the_share_of_the_score():
    from semppl_jax import pseudo_labels

    label, share, margin = pseudo_labels.vote_confidence(np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 4.0]]))
    assert label.tolist() == [1, 2]
    np.testing.assert_allclose(share, [0.75, 0.5])
    np.testing.assert_allclose(margin, [0.5, 0.25])
