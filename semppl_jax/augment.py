"""BYOL's colour augmentations, on device, per image, from explicit keys.

Crops are cut in tf.data (they change shapes); everything here keeps shapes, so
it runs on the accelerator inside the jitted step. Each image's key is folded
from the step key with the view and the image's *global* index, so results do
not depend on how the batch is sharded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

IMAGENET_MEAN = jnp.array([0.485, 0.456, 0.406], jnp.float32)
IMAGENET_STD = jnp.array([0.229, 0.224, 0.225], jnp.float32)

def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = jnp.max(rgb, axis=-1)
    c = v - jnp.min(rgb, axis=-1)
    s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
    safe_c = jnp.where(c > 0, c, 1.0)
    h = jnp.where(v == r, (g - b) / safe_c, jnp.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
    h = jnp.where(c > 0, (h / 6.0) % 1.0, 0.0)
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    k = jnp.stack([5.0, 3.0, 1.0])
    p = (k + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * jnp.clip(jnp.minimum(p, 4.0 - p), 0.0, 1.0)


def _brightness(key, x, delta):
    return x + jax.random.uniform(key, (), minval=-delta, maxval=delta)


def _contrast(key, x, delta):
    f = jax.random.uniform(key, (), minval=1.0 - delta, maxval=1.0 + delta)
    mean = jnp.mean(x, axis=(0, 1), keepdims=True)
    return (x - mean) * f + mean


def _saturation(key, x, delta):
    f = jax.random.uniform(key, (), minval=1.0 - delta, maxval=1.0 + delta)
    hsv = rgb_to_hsv(jnp.clip(x, 0.0, 1.0))
    return hsv_to_rgb(hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * f, 0.0, 1.0)))


def _hue(key, x, delta):
    d = jax.random.uniform(key, (), minval=-delta, maxval=delta)
    hsv = rgb_to_hsv(jnp.clip(x, 0.0, 1.0))
    return hsv_to_rgb(hsv.at[..., 0].set((hsv[..., 0] + d) % 1.0))


def color_jitter(key: jax.Array, x: jax.Array, brightness: float, contrast: float, saturation: float,
                 hue: float) -> jax.Array:
    """The four jitters in a random order, each clipped to [0, 1] as BYOL does."""
    order_key, *keys = jax.random.split(key, 5)
    order = jax.random.permutation(order_key, 4)
    ops = [lambda k, y: _brightness(k, y, brightness), lambda k, y: _contrast(k, y, contrast),
           lambda k, y: _saturation(k, y, saturation), lambda k, y: _hue(k, y, hue)]
    for i in range(4):
        x = jnp.clip(jax.lax.switch(order[i], ops, keys[i], x), 0.0, 1.0)
    return x


def to_grayscale(x: jax.Array) -> jax.Array:
    gray = jnp.tensordot(x, jnp.array([0.2989, 0.587, 0.114], x.dtype), axes=1)
    return jnp.repeat(gray[..., None], 3, axis=-1)


def gaussian_blur(key: jax.Array, x: jax.Array, kernel_size: int, sigma_min: float = 0.1,
                  sigma_max: float = 2.0) -> jax.Array:
    sigma = jax.random.uniform(key, (), minval=sigma_min, maxval=sigma_max)
    radius = kernel_size // 2
    t = jnp.arange(-radius, radius + 1, dtype=x.dtype)
    k = jnp.exp(-0.5 * jnp.square(t / sigma))
    k = k / jnp.sum(k)
    # Separable depthwise convolution with reflect-free zero padding, as BYOL.
    xh = jax.lax.conv_general_dilated(x[None], jnp.tile(k[:, None, None, None], (1, 1, 1, 3)),
                                      (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=3)
    xw = jax.lax.conv_general_dilated(xh, jnp.tile(k[None, :, None, None], (1, 1, 1, 3)),
                                      (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=3)
    return xw[0]


def solarize(x: jax.Array, threshold: float = 0.5) -> jax.Array:
    return jnp.where(x < threshold, x, 1.0 - x)


def augment_image(key: jax.Array, x: jax.Array, blur_p: jax.Array, solarize_p: jax.Array,
                  cfg: Any) -> jax.Array:
    """One image [H, W, 3] in [0, 1] -> augmented, normalised with ImageNet statistics."""
    k_flip, k_jit, k_jit_p, k_gray, k_blur, k_blur_p, k_sol = jax.random.split(key, 7)
    if cfg.get("flip", True):
        x = jnp.where(jax.random.uniform(k_flip) < 0.5, x[:, ::-1], x)
    jittered = color_jitter(k_jit, x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    x = jnp.where(jax.random.uniform(k_jit_p) < cfg.color_jitter_prob, jittered, x)
    x = jnp.where(jax.random.uniform(k_gray) < cfg.grayscale_prob, to_grayscale(x), x)
    kernel = max(3, (x.shape[0] // 10) | 1)
    x = jnp.where(jax.random.uniform(k_blur_p) < blur_p, gaussian_blur(k_blur, x, kernel), x)
    x = jnp.where(jax.random.uniform(k_sol) < solarize_p, solarize(x), x)
    return normalize(jnp.clip(x, 0.0, 1.0))


def normalize(x: jax.Array) -> jax.Array:
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def augment_views(key: jax.Array, views: jax.Array, view_offset: int, global_index: jax.Array,
                  cfg: Any) -> jax.Array:
    """Views ``[V, n, H, W, 3]`` uint8 -> augmented float32.

    View ``view_offset + v`` uses recipe ``(view_offset + v) % len(recipes)``
    (BYOL's two recipes alternate) and keys folded from (view, global index).
    All views and images go through one ``vmap``: one copy of the graph.
    """
    num_views, n = views.shape[:2]
    view_ids = view_offset + jnp.arange(num_views)
    keys = jax.vmap(lambda v: jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, v), i))(
        global_index))(view_ids)
    blur = jnp.asarray(cfg.blur_prob, jnp.float32)[view_ids % len(cfg.blur_prob)]
    sol = jnp.asarray(cfg.solarize_prob, jnp.float32)[view_ids % len(cfg.solarize_prob)]
    flat = views.reshape((num_views * n,) + views.shape[2:]).astype(jnp.float32) / 255.0
    out = jax.vmap(lambda k, x, bp, sp: augment_image(k, x, bp, sp, cfg))(
        keys.reshape((num_views * n,) + keys.shape[2:]), flat, jnp.repeat(blur, n), jnp.repeat(sol, n))
    return out.reshape(views.shape)


def preprocess_eval(images: jax.Array) -> jax.Array:
    """uint8 centre crops -> normalised float32 (no augmentation)."""
    return normalize(images.astype(jnp.float32) / 255.0)
