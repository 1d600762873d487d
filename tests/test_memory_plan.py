"""The memory plan: remat changes memory, not maths; a step that cannot fit stops with remedies."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import imagenet, tiny
from semppl_jax import memory, networks


@pytest.mark.parametrize("policy", ["block", "block_save_convs"])
def test_remat_gives_the_same_loss_and_gradients(policy):
    config = tiny.get_config()
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))

    def grads(remat):
        config.model.remat = remat
        net = networks.make_network(config.model, 10, None)
        params, state = net.init(jax.random.key(1), x, True)

        def loss(p):
            out, _ = net.apply(p, state, None, x, True)
            return jnp.sum(out["prediction"] ** 2)

        return jax.value_and_grad(loss)(params)

    (l0, g0), (l1, g1) = grads("none"), grads(policy)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The parameter names are untouched (checkpoints stay compatible).
    names = set(hk.data_structures.to_haiku_dict(g0)) ^ set(hk.data_structures.to_haiku_dict(g1))
    assert not names


def test_a_step_that_cannot_fit_stops_with_numbers_and_remedies():
    config = imagenet.get_config("resnet50,1pct")
    config.training.compute_dtype = "float32"
    usage = dict(arguments=2 * memory.GIB, outputs=2 * memory.GIB, temporaries=90 * memory.GIB,
                 aliased=2 * memory.GIB, peak=92 * memory.GIB)
    with pytest.raises(memory.DoesNotFitError) as err:
        memory.check_fits(usage, 80 * memory.GIB, config, num_devices=8)
    text = str(err.value)
    assert "92.00 GiB" in text and "80.00 GiB" in text and "512 images per device" in text
    assert "compute_dtype=bfloat16" in text and "model.remat=block" in text and "smaller per-device batch" in text
    memory.check_fits(usage, 100 * memory.GIB, config, num_devices=8)  # fits: no error
    memory.check_fits(usage, None, config, num_devices=8)  # no limit known (CPU): no error


def test_accelerator_presets_default_to_bf16_and_the_demo_to_float32():
    from experiments import mnist5k

    assert imagenet.get_config("resnet50,1pct").training.compute_dtype == "bfloat16"
    assert mnist5k.get_config("0.1").training.compute_dtype == "float32"
