"""Every parameter and state name and shape equals the released checkpoints'."""

import json

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import default_config, networks
from tests.conftest import TEST_DATA

MANIFEST = TEST_DATA / "official_param_manifest.json"  # a copy of the released manifest
ARCHS = {"TinyResNet_1x": ("tiny", 1), "ResNet18_1x": ("resnet18", 1), "ResNet50_1x": ("resnet50", 1),
         "ResNet50_2x": ("resnet50", 2), "ResNet200_2x": ("resnet200", 2)}


def model_config(depth, width=1, v2=False, sk=0.0, hidden=4096, proj=256, pool=True, stride=2):
    c = default_config.base_config().model
    c.update(dict(depth=depth, width_multiplier=width, resnet_v2=v2, sk_ratio=sk, stem_max_pool=pool,
                  stem_stride=stride, bn_decay=0.9, projector_hidden_size=hidden, predictor_hidden_size=hidden,
                  projection_size=proj))
    return c


def shapes(depth, width, **kw):
    net = networks.make_network(model_config(depth, width, **kw), 1000, None)
    return jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), True))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_names_and_shapes_match_released_manifest(arch):
    manifest = json.loads(MANIFEST.read_text())[arch]
    params, state = shapes(*ARCHS[arch])
    got_params = {f"{m}/{n}": list(v.shape) for m, d in params.items() for n, v in d.items()}
    got_state = {f"{m}/{n}": [list(v.shape), str(v.dtype)] for m, d in state.items() for n, v in d.items()}
    assert got_params == manifest["params"]
    assert got_state == manifest["state"]


@pytest.mark.parametrize("depth", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_every_depth_and_width_builds(depth):
    for width in (1, 2, 4) if depth == "resnet50" else (1,):
        params, _ = shapes(depth, width, hidden=32, proj=16)
        embed = params[f"{networks.MODULE_NAMES[depth]}/~/initial_conv"]["w"].shape[-1]
        assert embed == 64 * width
        assert params["projector/linear"]["w"].shape[0] == networks.RESNET_SPECS[depth].channels_per_group[-1] * width


def test_fractional_width_halves_every_layer():
    full, _ = shapes("small", 1, hidden=32, proj=16)
    half, _ = shapes("small", 0.5, hidden=32, proj=16)
    assert full.keys() == half.keys()
    for module in full:
        for name, w in full[module].items():
            if module.startswith("small_res_net") and name == "w":  # conv kernels: in and out halved
                cin = w.shape[-2] if w.shape[-2] == 3 else w.shape[-2] // 2
                assert half[module][name].shape == w.shape[:-2] + (cin, w.shape[-1] // 2), module
    with pytest.raises(ValueError, match="whole channel counts"):
        shapes("small", 0.3, hidden=32, proj=16)


def test_the_stem_sets_group_0s_resolution_and_not_the_parameters():
    """Same parameters whatever the stem's pool and stride (names and shapes cannot tell them
    apart, so the checkpoint's signature records both). From a 28-pixel image group 0 sees
    7x7 with ResNet's stem, 14x14 without the pool, 28x28 with a stride-1 conv and no pool;
    the stride-1 conv's map at odd positions is the stride-2 conv's (XLA's SAME pads 2 before
    and 3 after for stride 2, 3 and 3 for stride 1)."""
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 3))
    group_inputs, stem_outputs = {}, {}

    def record(stem):
        def interceptor(method, args, kwargs, context):
            out = method(*args, **kwargs)
            if isinstance(context.module, networks.BlockGroup) and context.method_name == "__call__":
                group_inputs.setdefault(stem, []).append(args[0].shape[1:3])
            if isinstance(context.module, hk.Conv2D) and context.module.module_name.endswith("initial_conv"):
                stem_outputs[stem] = out
            return out
        return interceptor

    stems = ((True, 2), (False, 2), (False, 1))
    net = {stem: networks.make_network(model_config("small", hidden=32, proj=16, pool=stem[0], stride=stem[1]),
                                       10, None) for stem in stems}
    params, state = net[True, 2].init(jax.random.key(0), x, True)
    out = {}
    for stem in stems:
        assert jax.tree.map(jnp.shape, net[stem].init(jax.random.key(0), x, True)) == jax.tree.map(
            jnp.shape, (params, state))
        with hk.intercept_methods(record(stem)):
            out[stem] = net[stem].apply(params, state, None, x, False)[0]["embedding"]
    assert group_inputs[True, 2] == [(7, 7), (7, 7), (4, 4), (2, 2)]
    assert group_inputs[False, 2] == [(14, 14), (14, 14), (7, 7), (4, 4)]
    assert group_inputs[False, 1] == [(28, 28), (28, 28), (14, 14), (7, 7)]
    np.testing.assert_allclose(stem_outputs[False, 1][:, 1::2, 1::2], stem_outputs[False, 2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[True, 2], out[False, 2])
    assert not np.allclose(out[False, 2], out[False, 1])


def _forward(depth, **kw):
    net = networks.make_network(model_config(depth, hidden=32, proj=16, **kw), 10, None)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params, state = net.init(jax.random.key(0), x, True)
    out, _ = net.apply(params, state, None, x, True)
    return params, out


def test_selective_kernel_variant_runs_and_has_sk_modules():
    params, out = _forward("resnet50", sk=0.0625)
    assert any("sk_conv_1" in name for name in params)
    assert "res_net50/~/initial_conv_0" in params  # SimCLRv2's deep stem
    assert np.isfinite(np.asarray(out["prediction"])).all() and out["embedding"].shape == (2, 2048)


def test_resnet_v2_runs_with_final_batchnorm():
    params, out = _forward("resnet18", v2=True)
    assert "res_net18/~/final_batchnorm" in params
    assert np.isfinite(np.asarray(out["logits"])).all() and out["logits"].shape == (2, 10)


def test_selective_kernels_need_a_bottleneck():
    with pytest.raises(ValueError, match="bottleneck"):
        _forward("resnet18", sk=0.0625)


def test_probe_sees_a_stop_gradient_embedding():
    net = networks.make_network(model_config("tiny", hidden=16, proj=8), 10, None)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    params, state = net.init(jax.random.key(0), x, True)

    def probe_loss(p):
        return jnp.sum(net.apply(p, state, None, x, True)[0]["logits"])

    grads = jax.grad(probe_loss)(params)
    for module, g in grads.items():
        norm = sum(float(jnp.sum(jnp.abs(v))) for v in g.values())
        assert (norm > 0) == (module == "classifier"), module
    assert isinstance(hk.data_structures.to_haiku_dict(params), dict)
