"""The evaluation protocols do what their names say: linear evaluation leaves the encoder
and its BatchNorm statistics untouched, fine-tuning moves both, and the online k-NN
logged during pretraining equals the offline k-NN of the saved encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import eval as eval_presets
from experiments import tiny
from semppl_jax import datasets, evaluation, jobs, sharding
from semppl_jax.metric_writers import read_jsonl

HEAD = evaluation.HEAD


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    config = tiny.get_config()
    config.training.update(num_steps=4, log_every_steps=2, eval_every_steps=4, eval_max_examples=48)
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    jobs.train(config, workdir)
    return config, workdir


def flat(tree):
    return {f"{m}/{n}": np.asarray(v) for m, vs in tree.items() for n, v in vs.items()}


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_linear_leaves_the_encoder_and_its_statistics_finetune_moves_them(pretrained, protocol):
    config, workdir = pretrained
    eval_config = eval_presets.get_config(f"{protocol},tiny")
    eval_config.eval.update(num_epochs=2.0, batch_size=16)
    source = datasets.load_split(eval_config, "train")
    labelled = np.ones(source.num_ids, bool)  # every image: enough steps to move everything
    pre = evaluation.load_pretrained(workdir, eval_config)
    net, state, _ = evaluation.fit_classifier(eval_config, source, labelled, sharding.make_mesh(),
                                              (pre.params, pre.state), protocol)
    after_params, after_state = flat(jax.device_get(state.params)), flat(jax.device_get(state.net_state))
    before_params, before_state = flat(pre.params), flat(pre.state)
    encoder = [k for k in after_params if not k.startswith(HEAD)]
    stats = [k for k in after_state if k in before_state]
    assert encoder and stats and any(k.startswith(HEAD) for k in after_params)
    moved = [k for k in encoder if not np.array_equal(after_params[k], before_params[k])]
    stats_moved = [k for k in stats if not np.array_equal(after_state[k], before_state[k])]
    if protocol == "linear":
        assert moved == [] and stats_moved == []
    else:
        assert len(moved) == len(encoder) and len(stats_moved) > len(stats) // 2
    head = [k for k in after_params if k.startswith(HEAD) and k.endswith("w")]
    init_net = evaluation.make_classifier(eval_config.model, source.num_classes, None)
    fresh, _ = init_net.init(jax.random.key(eval_config.seed + 17), jnp.zeros((2, 32, 32, 3)), True)
    assert not np.array_equal(after_params[head[0]], np.asarray(flat(fresh)[head[0]]))  # the head learned


def test_online_knn_equals_the_offline_knn_of_the_saved_encoder(pretrained, tmp_path):
    config, workdir = pretrained
    online = [r for r in read_jsonl(f"{workdir}/metrics.jsonl") if "knn_top1" in r][-1]
    assert online["step"] == 4
    eval_config = eval_presets.get_config("knn,tiny")
    eval_config.eval.update(checkpoint=workdir, max_test_examples=48)
    offline = jobs.evaluate(eval_config, str(tmp_path / "knn"))
    assert offline["step"] == 4 and offline["num_examples"] == 48
    assert np.isclose(online["knn_top1"], offline["top1"], atol=1e-9)
    assert np.isclose(online["knn_top5"], offline["top5"], atol=1e-9)
