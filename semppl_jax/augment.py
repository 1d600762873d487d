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

def _channel_max_min(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-pixel max and min over the 3 channels, written elementwise (not as a
    reduction) so that XLA fuses it with its neighbours: fewer passes over the image."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return jnp.maximum(jnp.maximum(r, g), b), jnp.minimum(jnp.minimum(r, g), b)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, lo = _channel_max_min(rgb)
    c = v - lo
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


def _adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
    """HSV saturation scaled by ``factor`` (clipped to [0, 1]) without the HSV round trip.

    With v = max channel and c = v - min channel, a pixel is v - c g(h), g in [0, 1]
    per channel; scaling S = c / v by f gives v - min(f c, v) g(h), i.e. each channel
    moves towards v by the factor min(f c, v) / c. Equal to ``hsv_to_rgb`` after
    ``rgb_to_hsv`` up to rounding (``tests/test_augment.py``)."""
    v, lo = _channel_max_min(x)
    v, c = v[..., None], (v - lo)[..., None]
    scale = jnp.where(c > 0, jnp.minimum(factor * c, v) / jnp.where(c > 0, c, 1.0), 1.0)
    return v - (v - x) * scale


def _adjust_hue(x: jax.Array, delta: jax.Array) -> jax.Array:
    """HSV hue shifted by ``delta`` (a fraction of the circle), S and V kept.

    Elementwise, so that XLA fuses it into few passes: with v = max, c = max - min
    and hue h, channel k is v - c clip(min(p, 4 - p), 0, 1), p = (k + 6h) mod 6 for
    k = 5, 3, 1 (r, g, b): ``hsv_to_rgb(rgb_to_hsv(x))`` with v s = c, up to rounding
    (``tests/test_augment.py``)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, lo = _channel_max_min(x)
    c = v - lo
    safe_c = jnp.where(c > 0, c, 1.0)
    h = jnp.where(v == r, (g - b) / safe_c, jnp.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
    h = jnp.where(c > 0, (h / 6.0) % 1.0, 0.0)
    p = (jnp.asarray([5.0, 3.0, 1.0], x.dtype) + ((h + delta) % 1.0)[..., None] * 6.0) % 6.0
    return v[..., None] - c[..., None] * jnp.clip(jnp.minimum(p, 4.0 - p), 0.0, 1.0)


def color_jitter(key: jax.Array, x: jax.Array, brightness: float, contrast: float, saturation: float,
                 hue: float) -> jax.Array:
    """BYOL's four jitters in a random order, each applied once and clipped to [0, 1].

    Under ``vmap`` a ``lax.switch`` over the order evaluates every op at every
    position as separate computations (16 ops, 8 of them HSV round trips, each a
    few passes over memory). Here position ``i`` draws its factor from ``keys[i]``
    as the switch did (same distribution, image for image: ``tests/test_augment.py``);
    brightness, contrast and saturation share one per-pixel form ``x -> a x + b``,
    and hue is a closed-form elementwise formula, so a position is one fused pass
    over the image (hue's formula rides along in that pass where it is not drawn,
    which costs arithmetic, not memory). Ops whose strength is 0 are not built.
    """
    order_key, *keys = jax.random.split(key, 5)
    order = jax.random.permutation(order_key, 4)  # order[i]: the op at position i
    strength = jnp.asarray([brightness, contrast, saturation, hue], jnp.float32)
    centre = jnp.asarray([0.0, 1.0, 1.0, 0.0], jnp.float32)  # brightness/hue add, contrast/saturation scale
    # The factor of the op at position i, drawn from keys[i] exactly as a switch would.
    factor = jnp.stack([jax.random.uniform(keys[i], (), minval=centre[order[i]] - strength[order[i]],
                                           maxval=centre[order[i]] + strength[order[i]]) for i in range(4)])

    def affine_op(x: jax.Array, i: int) -> jax.Array:
        """The brightness, contrast or saturation op at position i (identity if it is hue)."""
        op, f = order[i], factor[i]
        mean = jnp.mean(x, axis=(0, 1), keepdims=True) if contrast else 0.0
        a = jnp.where(op == 1, f, 1.0)
        b = jnp.where(op == 0, f, 0.0) + jnp.where(op == 1, (1.0 - f) * mean, 0.0)
        y = a * x + b
        if saturation:
            y = jnp.where(op == 2, _adjust_saturation(x, f), y)
        return jnp.clip(y, 0.0, 1.0)

    for i in range(4):  # hue, where drawn, in place of the affine op: one fused pass a position
        if hue:
            hued = jnp.clip(_adjust_hue(x, factor[i]), 0.0, 1.0)
            x = jnp.where(order[i] == 3, hued, affine_op(x, i))
        else:
            x = jnp.where(order[i] == 3, x, affine_op(x, i))
    return x


def to_grayscale(x: jax.Array) -> jax.Array:
    gray = 0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]  # elementwise: fuses
    return jnp.repeat(gray[..., None], 3, axis=-1)


def _blur_kernel(key: jax.Array, kernel_size: int, dtype: Any, sigma_min: float, sigma_max: float,
                 apply: jax.Array | bool) -> jax.Array:
    """The 1-D Gaussian of a drawn sigma, normalised; a delta where the blur is not drawn."""
    sigma = jax.random.uniform(key, (), minval=sigma_min, maxval=sigma_max)
    radius = kernel_size // 2
    t = jnp.arange(-radius, radius + 1, dtype=dtype)
    k = jnp.exp(-0.5 * jnp.square(t / sigma))
    return jnp.where(apply, k / jnp.sum(k), (t == 0).astype(dtype))


def gaussian_blur(key: jax.Array, x: jax.Array, kernel_size: int, sigma_min: float = 0.1,
                  sigma_max: float = 2.0, apply: jax.Array | bool = True) -> jax.Array:
    """Separable Gaussian blur. ``apply=False`` swaps in a delta kernel, which returns
    ``x`` exactly: one convolution whether or not the blur was drawn."""
    k = _blur_kernel(key, kernel_size, x.dtype, sigma_min, sigma_max, apply)
    # Separable depthwise convolution with reflect-free zero padding, as BYOL.
    xh = jax.lax.conv_general_dilated(x[None], jnp.tile(k[:, None, None, None], (1, 1, 1, 3)),
                                      (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=3)
    xw = jax.lax.conv_general_dilated(xh, jnp.tile(k[None, :, None, None], (1, 1, 1, 3)),
                                      (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=3)
    return xw[0]


def blur_matrix(kernel: jax.Array, size: int) -> jax.Array:
    """``[size, size]`` banded matrix ``M`` with ``M @ x`` = ``kernel`` slid along ``x``'s
    first axis with zero padding ("SAME"): ``M[i, j] = kernel[j - i + radius]``."""
    radius = kernel.shape[0] // 2
    d = jnp.arange(size)[None, :] - jnp.arange(size)[:, None] + radius
    return jnp.where((d >= 0) & (d < kernel.shape[0]), kernel[jnp.clip(d, 0, kernel.shape[0] - 1)], 0.0)


def gaussian_blur_banded(key: jax.Array, x: jax.Array, kernel_size: int, sigma_min: float = 0.1,
                         sigma_max: float = 2.0, apply: jax.Array | bool = True) -> jax.Array:
    """``gaussian_blur`` (same draw, same zero padding) as two banded matrix products,
    rows then columns: dense matmuls instead of a per-image grouped convolution, for
    accelerators where those are cheaper. Equal up to float summation order."""
    k = _blur_kernel(key, kernel_size, x.dtype, sigma_min, sigma_max, apply)
    rows = jnp.einsum("ij,jwc->iwc", blur_matrix(k, x.shape[0]), x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("ij,hjc->hic", blur_matrix(k, x.shape[1]), rows, precision=jax.lax.Precision.HIGHEST)


BLURS = {"conv": gaussian_blur, "banded_matmul": gaussian_blur_banded}


def rotate(x: jax.Array, angle: jax.Array) -> jax.Array:
    """``x`` [H, W, C] turned counter-clockwise by ``angle`` (radians) about its centre:
    bilinear, black (0) where the source falls outside. Shape-preserving, so it runs on
    device after the tf.data crop; at a right angle it equals ``jnp.rot90``."""
    h, w = x.shape[:2]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    dy, dx = jnp.meshgrid(jnp.arange(h, dtype=x.dtype) - cy, jnp.arange(w, dtype=x.dtype) - cx, indexing="ij")
    cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
    src = [cos * dy + sin * dx + cy, cos * dx - sin * dy + cx]  # where each output pixel reads from
    sample = lambda ch: jax.scipy.ndimage.map_coordinates(ch, src, order=1, mode="constant", cval=0.0)  # noqa: E731
    return jax.vmap(sample, in_axes=2, out_axes=2)(x)


def solarize(x: jax.Array, threshold: float = 0.5) -> jax.Array:
    return jnp.where(x < threshold, x, 1.0 - x)


def augment_image(key: jax.Array, x: jax.Array, blur_p: jax.Array, solarize_p: jax.Array,
                  cfg: Any) -> jax.Array:
    """One image [H, W, 3] in [0, 1] -> augmented, normalised with ImageNet statistics."""
    k_flip, k_jit, k_jit_p, k_gray, k_blur, k_blur_p, k_sol = jax.random.split(key, 7)
    if cfg.rotation_degrees:  # folded, not split: the other draws stay as they were without it
        degrees = jax.random.uniform(jax.random.fold_in(key, 7), (), minval=-1.0, maxval=1.0) * cfg.rotation_degrees
        x = rotate(x, jnp.deg2rad(degrees))
    if cfg.flip:
        x = jnp.where(jax.random.uniform(k_flip) < 0.5, x[:, ::-1], x)
    jittered = color_jitter(k_jit, x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    x = jnp.where(jax.random.uniform(k_jit_p) < cfg.color_jitter_prob, jittered, x)
    x = jnp.where(jax.random.uniform(k_gray) < cfg.grayscale_prob, to_grayscale(x), x)
    kernel = max(3, (x.shape[0] // 10) | 1)
    x = BLURS[cfg.blur_impl](k_blur, x, kernel, apply=jax.random.uniform(k_blur_p) < blur_p)
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
