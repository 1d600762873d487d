"""LARS, the learning-rate schedule and the target network's EMA schedule."""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp
import optax


def exclude_bias_and_norm(params: hk.Params) -> hk.Params:
    """True for weights that LARS adapts and decays: not biases, not BN parameters."""

    def keep(module_name: str, name: str, _: jax.Array) -> bool:
        last = module_name.split("/")[-1]
        return name not in ("b", "offset", "scale") and "batchnorm" not in last and "batch_norm" not in last

    return hk.data_structures.map(keep, params)


def learning_rate_schedule(base_lr: float, batch_size: int, total_steps: int, warmup_steps: int
                           ) -> optax.Schedule:
    """Linear warm-up to ``base_lr * batch / 256``, then cosine decay to zero.

    Written out rather than ``optax.warmup_cosine_decay_schedule``: optax's agrees to
    1.5e-7 relative, but that rounding moves the demo's printed figures."""
    peak = base_lr * batch_size / 256.0

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        cosine = 0.5 * peak * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def target_ema_schedule(base: float, total_steps: int) -> optax.Schedule:
    """BYOL's tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2."""

    def schedule(step: jax.Array) -> jax.Array:
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
        return 1.0 - (1.0 - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0

    return schedule


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """LARS (momentum, trust ratio and weight decay on conv/linear weights only)."""
    return optax.lars(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        weight_decay_mask=exclude_bias_and_norm,
        trust_coefficient=config.trust_coefficient,
        eps=0.0,
        trust_ratio_mask=exclude_bias_and_norm,
        momentum=config.momentum,
        nesterov=False,
    )


def ema_update(target: hk.Params, online: hk.Params, tau: jax.Array) -> hk.Params:
    return jax.tree.map(lambda t, o: tau * t + (1.0 - tau) * o, target, online)
