"""LARS masking, the learning-rate schedule and the target EMA schedule, by hand."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from semppl_jax import optim


def test_bias_and_batchnorm_are_excluded_from_adaptation_and_decay():
    params = {"res/~/conv_0": {"w": jnp.ones((3, 3, 2, 2))}, "res/~/batchnorm_0": {"scale": jnp.ones((1, 2)),
              "offset": jnp.zeros((1, 2))}, "projector/linear": {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)},
              "projector/batch_norm": {"scale": jnp.ones((1, 2)), "offset": jnp.zeros((1, 2))}}
    mask = optim.exclude_bias_and_norm(params)
    assert mask["res/~/conv_0"]["w"] and mask["projector/linear"]["w"]
    assert not any([mask["projector/linear"]["b"], mask["res/~/batchnorm_0"]["scale"],
                    mask["projector/batch_norm"]["offset"]])

    cfg = ml_collections.ConfigDict(dict(weight_decay=0.1, trust_coefficient=1e-3, momentum=0.9))
    tx = optim.make_optimizer(cfg, lambda step: 0.5)
    grads = {m: {n: jnp.full(v.shape, 2.0) for n, v in d.items()} for m, d in params.items()}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Excluded: plain -lr * g (no decay, no trust ratio).
    np.testing.assert_allclose(updates["projector/linear"]["b"], -0.5 * 2.0)
    np.testing.assert_allclose(updates["res/~/batchnorm_0"]["scale"], -0.5 * 2.0)
    # Adapted: g + wd * w, scaled to trust * |w| / |g + wd w|, times lr.
    w, g = params["projector/linear"]["w"], grads["projector/linear"]["w"]
    u = g + 0.1 * w
    expected = -0.5 * 1e-3 * np.linalg.norm(w) / np.linalg.norm(u) * u
    np.testing.assert_allclose(updates["projector/linear"]["w"], expected, rtol=1e-6)


def test_learning_rate_warmup_then_cosine_scaled_by_batch():
    lr = optim.learning_rate_schedule(0.2, batch_size=4096, total_steps=1000, warmup_steps=100)
    peak = 0.2 * 4096 / 256
    np.testing.assert_allclose([lr(0), lr(50), lr(100)], [0.0, peak / 2, peak], rtol=1e-6)
    np.testing.assert_allclose(lr(550), peak * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-5)
    np.testing.assert_allclose(lr(1000), 0.0, atol=1e-6)


def test_target_ema_schedule_is_byols():
    tau = optim.target_ema_schedule(0.996, total_steps=100)
    np.testing.assert_allclose([tau(0), tau(50), tau(100)], [0.996, 1 - 0.004 / 2, 1.0], rtol=1e-6)
    target = {"m": {"w": jnp.zeros(3)}}
    online = {"m": {"w": jnp.ones(3)}}
    np.testing.assert_allclose(optim.ema_update(target, online, 0.9)["m"]["w"], 0.1, rtol=1e-6)


@pytest.mark.parametrize("total,warmup", [(1000, 100), (2046, 62), (682, 0), (10, 10), (1, 0)])
def test_learning_rate_equals_a_plain_warmup_cosine_at_every_step(total, warmup):
    """optax's warm-up cosine against the formula written out, at every step and past the end."""
    lr = optim.learning_rate_schedule(4.0, batch_size=128, total_steps=total, warmup_steps=warmup)
    peak = 4.0 * 128 / 256
    for step in range(total + 3):
        if step < warmup:
            want = peak * step / warmup
        else:
            progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
            want = 0.5 * peak * (1 + math.cos(math.pi * progress))
        np.testing.assert_allclose(float(lr(step)), want, rtol=2e-6, atol=1e-6)
