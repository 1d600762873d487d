"""The comparison script's bookkeeping: overrides, tables and paired differences."""

import json

import pytest

from benchmarks import compare
from experiments import mnist5k
from semppl_jax import config_checks


def _result(method, seed, top1, knn=None, fraction=0.1):
    r = dict(method=method, fraction=fraction, seed=seed, top1=top1, top5=1.0,
             pseudo_label_curve=[[10, 0.2], [20, 0.4]] if method == "semppl" else [])
    if knn is not None:
        r["knn_top1"] = knn
    return r


def test_overrides_are_typed_and_unknown_fields_refused():
    config = mnist5k.get_config("0.01")
    config_checks.apply_overrides(config, ["semppl.knn_k=5", "optim.base_lr=2", "semppl.knn_query=online"])
    assert (config.semppl.knn_k, config.optim.base_lr, config.semppl.knn_query) == (5, 2.0, "online")
    assert isinstance(config.optim.base_lr, float)
    with pytest.raises(config_checks.ConfigError, match="no field 'semppl.knn_kk'"):
        config_checks.apply_overrides(config, ["semppl.knn_kk=5"])
    with pytest.raises(config_checks.ConfigError, match="expected field=value"):
        config_checks.apply_overrides(config, ["semppl.knn_k"])


def test_demo_queue_scales_with_the_label_fraction():
    assert mnist5k.get_config("0.1").semppl.queue_size == 1600
    assert mnist5k.get_config("0.01").semppl.queue_size == 160


def test_report_tables_match_hand_computed_statistics(tmp_path):
    results = [_result("semppl", 0, 0.90, knn=0.80), _result("alpha0", 0, 0.88, knn=0.70),
               _result("supervised", 0, 0.85), _result("semppl", 1, 0.80, knn=0.60),
               _result("alpha0", 1, 0.84, knn=0.70), _result("supervised", 1, 0.75)]
    table = compare.write_report(results, str(tmp_path))
    # Mean ± standard error (sample std / sqrt(n); for n = 2 that is |a - b| / 2):
    # SemPPL 90 / 80 -> 85.0 ± 5.0; alpha0 88 / 84 -> 86.0 ± 2.0; supervised 85 / 75 -> 80.0 ± 5.0.
    assert "| 10% | 85.0 ± 5.0 (n=2) | 86.0 ± 2.0 (n=2) | 80.0 ± 5.0 (n=2) |" in table
    assert "| 10% | 70.0 ± 10.0 (n=2) | 70.0 ± 0.0 (n=2) | – |" in table  # k-NN (no pixel baseline given)
    # Paired: +2, -4 -> -1.0 +- 3.0 (1 of 2); +5, +5 -> +5.0 +- 0.0 (2 of 2); k-NN +10, -10 -> 0 +- 10.
    assert ("| 10% | -1.0 ± 3.0 (SemPPL ahead in 1 of 2) | +5.0 ± 0.0 (SemPPL ahead in 2 of 2) | "
            "+0.0 ± 10.0 (SemPPL ahead in 1 of 2) |") in table
    for name in ("comparison.md", "comparison.png", "pseudo_labels.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "comparison.json").read_text()) == results


def test_finished_runs_collects_every_result_in_the_workdir(tmp_path):
    runs = [_result("semppl", 3, 0.9, fraction=0.01), _result("supervised", 0, 0.5)]
    for r in runs:
        run_dir = tmp_path / f"{r['method']}_{r['fraction']}_seed{r['seed']}"
        run_dir.mkdir()
        (run_dir / "result.json").write_text(json.dumps(r))
    (tmp_path / "alpha0_0.1_seed0").mkdir()  # unfinished: no result.json
    (tmp_path / "notes").mkdir()
    assert sorted(compare.finished_runs(str(tmp_path)), key=lambda r: r["seed"]) == [runs[1], runs[0]]


def test_evaluation_configs_follow_their_pretraining_run():
    """One helper builds every evaluation of a pretraining run (demo, compare, sweep):
    the run's network with its overrides, its seeds, the evaluated fraction's subset."""
    from experiments import eval as eval_presets

    pre = mnist5k.get_config("0.1")
    config_checks.apply_overrides(pre, ["model.width_multiplier=1.0", "model.stem_max_pool=false",
                                        "dataset.name=folder:/data/own", "dataset.eval_split=val"])
    pre.seed = pre.dataset.label_seed = 3
    knn = eval_presets.for_pretraining("knn", "mnist5k,0.01", pre, "/runs/a/pretrain")
    assert knn.model.to_dict() == pre.model.to_dict()
    assert (knn.dataset.name, knn.dataset.eval_split) == ("folder:/data/own", "val")  # the data it read
    assert (knn.seed, knn.dataset.label_seed, knn.dataset.label_subset) == (3, 3, "0.01")
    assert (knn.eval.protocol, knn.eval.checkpoint, knn.eval.knn_k) == ("knn", "/runs/a/pretrain", 20)
    knn.model.width_multiplier = 0.5  # a copy: the pretraining config is not touched
    assert pre.model.width_multiplier == 1.0
    fine = compare.eval_config("finetune", "semppl", "0.1", pre, "/runs/a/pretrain")
    scratch = compare.eval_config("finetune", "supervised", "0.1", pre, "/runs/a/pretrain")
    assert (fine.eval.checkpoint, scratch.eval.checkpoint) == ("/runs/a/pretrain", "scratch")
    assert scratch.eval.num_epochs == 3 * fine.eval.num_epochs and scratch.eval.base_lr == 4 * fine.eval.base_lr


def test_variant_report_pairs_each_variant_with_the_recipe_by_seed():
    base = [_result("semppl", 0, 0.90, knn=0.80), _result("semppl", 1, 0.80, knn=0.60),
            _result("alpha0", 0, 0.88, knn=0.70), _result("alpha0", 1, 0.84, knn=0.70)]
    variant = [_result("semppl", 0, 0.91, knn=0.82), _result("semppl", 1, 0.79, knn=0.66),
               _result("semppl", 2, 0.85, knn=0.90)]  # seed 2 has no partner: in the mean, not in a pair
    row = compare.variant_report(base, {"m1": variant}).splitlines()[2]
    assert row == ("| m1 | 10% | 79.3 ± 7.1 (n=3) | +4.0 ± 2.0 (variant ahead in 2 of 2) | "
                   "+4.0 ± 8.0 (variant ahead in 1 of 2) | 85.0 ± 3.5 (n=3) | +0.0 ± 1.0 (variant ahead in 1 of 2) |")


def test_alpha0_twin_is_reused_only_for_the_same_pretraining(tmp_path):
    """An alpha = 0 encoder pretrained at one label fraction serves another only when every
    field that can change it is equal (an augmentation change included)."""
    from semppl_jax.paths import write_json_atomic

    def config(fraction, *overrides):
        c = mnist5k.get_config(fraction)
        c.seed = c.dataset.label_seed = 1
        c.semppl.alpha = 0.0
        config_checks.apply_overrides(c, list(overrides))
        return c

    done = tmp_path / "alpha0_0.01_seed1" / "pretrain"
    done.mkdir(parents=True)
    write_json_atomic(str(done / "config.json"), config("0.01").to_dict())
    write_json_atomic(str(done / "train_summary.json"), {"step": 1})
    here = str(tmp_path / "alpha0_0.1_seed1")
    assert compare.alpha0_twin(here, 1, config("0.1")) == str(done)
    assert compare.alpha0_twin(here, 1, config("0.1", "training.eval_every_steps=100")) == str(done)
    assert compare.alpha0_twin(here, 1, config("0.1", "augment.rotation_degrees=0")) is None
    assert compare.alpha0_twin(here, 1, config("0.1", "optim.base_lr=2")) is None
    assert compare.alpha0_twin(here, 2, config("0.1")) is None


def test_unsure_study_pairs_each_variant_run_with_the_same_seeds_alpha0(tmp_path):
    from benchmarks import unsure_study

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(dict(step=1, pseudo_label_accuracy=0.5)) + "\n"
                       + json.dumps(dict(step=2, pseudo_label_accuracy=0.7, sure_vote_fraction=0.4,
                                         sure_pseudo_label_accuracy=0.95, queue_held_out_accuracy=0.625)) + "\n")
    base = [_result("alpha0", 0, 0.80, knn=0.70), _result("alpha0", 1, 0.90, knn=0.80),
            _result("alpha0", 2, 0.50, knn=0.50, fraction=0.01)]
    gate = [dict(_result("semppl", s, top1, knn=knn), pretrain_dir=str(tmp_path))
            for s, top1, knn in ((0, 0.85, 0.75), (1, 0.88, 0.83), (2, 0.99, 0.99))]  # seed 2: no alpha0 twin
    (row,) = unsure_study.rows(base, {"gate": gate})
    assert row["seeds"] == [0, 1] and row["knn_top1"] == pytest.approx([75.0, 83.0])
    assert row["knn_top1_gain"] == pytest.approx([5.0, 3.0]) and row["top1_gain"] == pytest.approx([5.0, -2.0])
    assert row["pseudo_label_accuracy"] == pytest.approx(70.0) and row["sure_vote_fraction"] == pytest.approx(40.0)
    line = unsure_study.table([row]).splitlines()[-1]
    assert "+4.0 ± 1.0, ahead in 2 of 2" in line and "+1.5 ± 3.5, ahead in 1 of 2" in line and "40 / 95.0" in line
    assert "| 70.0 | 62.5 | 40 / 95.0 |" in line


def test_alpha0_twin_in_a_workdir_not_made_yet(tmp_path):
    """alpha = 0 may be the first method of a fresh comparison: no workdir, no twin."""
    config = mnist5k.get_config("0.01")
    assert compare.alpha0_twin(str(tmp_path / "new" / "alpha0_0.01_seed0"), 0, config) is None
