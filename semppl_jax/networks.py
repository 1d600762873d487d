"""Haiku networks: ResNet v1/v2 (optionally with selective kernels) and MLP heads.

Module and parameter names follow Haiku's defaults exactly as the released
SemPPL/BYOL checkpoints have them (``res_net50/~/block_group_0/~/block_0/~/conv_0``,
``projector/linear``...), so that exported checkpoints load in the authors'
evaluation code and theirs load in ours. ``tests/test_networks.py`` checks every
name and shape against ``tests/data/official_param_manifest.json`` (a copy of the released manifest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

BN_DEFAULTS: Mapping[str, Any] = dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True)


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """Depth-dependent layout of a ResNet."""

    blocks_per_group: tuple[int, ...]
    channels_per_group: tuple[int, ...]
    bottleneck: bool
    stem_channels: int = 64


# Basic-block nets use a projection shortcut in every group's first block, as
# the released ResNet-18 checkpoint has (block_group_0/~/block_0/~/shortcut_conv).
RESNET_SPECS: Mapping[str, ResNetSpec] = {
    "tiny": ResNetSpec((1, 1, 1, 1), (8, 8, 8, 8), bottleneck=False),
    # Not a released architecture: a ResNet-10 for the CPU demo on 28-pixel digits.
    "small": ResNetSpec((1, 1, 1, 1), (32, 64, 128, 256), bottleneck=False, stem_channels=32),
    "resnet18": ResNetSpec((2, 2, 2, 2), (64, 128, 256, 512), bottleneck=False),
    "resnet34": ResNetSpec((3, 4, 6, 3), (64, 128, 256, 512), bottleneck=False),
    "resnet50": ResNetSpec((3, 4, 6, 3), (256, 512, 1024, 2048), bottleneck=True),
    "resnet101": ResNetSpec((3, 4, 23, 3), (256, 512, 1024, 2048), bottleneck=True),
    "resnet152": ResNetSpec((3, 8, 36, 3), (256, 512, 1024, 2048), bottleneck=True),
    "resnet200": ResNetSpec((3, 24, 36, 3), (256, 512, 1024, 2048), bottleneck=True),
}

# Haiku derives a module's default name from its class name; the released
# checkpoints were written by classes with these names.
MODULE_NAMES: Mapping[str, str] = {
    "tiny": "tiny_res_net",
    "small": "small_res_net",
    "resnet18": "res_net18",
    "resnet34": "res_net34",
    "resnet50": "res_net50",
    "resnet101": "res_net101",
    "resnet152": "res_net152",
    "resnet200": "res_net200",
}


def _bn(name: str, bn_config: Mapping[str, Any], **kwargs: Any) -> hk.BatchNorm:
    return hk.BatchNorm(name=name, **{**bn_config, **kwargs})


class SelectiveKernelConv(hk.Module):
    """SimCLRv2's selective-kernel 3x3 convolution (two branches, soft attention).

    One convolution yields both branches (2C channels); a squeeze-excite style
    gate computed from their sum picks a per-channel softmax mix of the two.
    """

    def __init__(self, channels: int, stride: int, bn_config: Mapping[str, Any], sk_ratio: float,
                 min_dim: int = 32, name: str | None = None):
        super().__init__(name=name)
        self._channels = channels
        self._stride = stride
        self._bn_config = bn_config
        self._hidden = max(int(channels * sk_ratio), min_dim)

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        c = self._channels
        x = hk.Conv2D(2 * c, 3, self._stride, with_bias=False, padding="SAME", name="conv")(x)
        x = jax.nn.relu(_bn("batchnorm", self._bn_config)(x, is_training))
        branches = jnp.stack(jnp.split(x, 2, axis=-1), axis=0)  # [2, N, H, W, C]
        gate = jnp.mean(jnp.sum(branches, axis=0), axis=(1, 2), keepdims=True)
        gate = hk.Conv2D(self._hidden, 1, with_bias=False, name="fc_0")(gate)
        gate = jax.nn.relu(_bn("fc_batchnorm", self._bn_config)(gate, is_training))
        gate = hk.Conv2D(2 * c, 1, with_bias=False, name="fc_1")(gate)
        gate = jax.nn.softmax(jnp.stack(jnp.split(gate, 2, axis=-1), axis=0), axis=0)
        return jnp.sum(branches * gate, axis=0)


class Block(hk.Module):
    """Residual block, v1 (post-activation) or v2 (pre-activation), basic or bottleneck."""

    def __init__(self, channels: int, stride: int, use_projection: bool, bottleneck: bool,
                 bn_config: Mapping[str, Any], resnet_v2: bool, sk_ratio: float,
                 name: str | None = None):
        super().__init__(name=name)
        self._v2 = resnet_v2
        self._stride = stride
        self._sk = sk_ratio > 0
        self._use_projection = use_projection
        if self._sk and resnet_v2:
            raise ValueError("selective kernels are implemented for ResNet v1 only")
        if use_projection:
            # With selective kernels SimCLRv2 uses a ResNet-D shortcut: average
            # pooling does the striding so the 1x1 conv sees every pixel.
            self.proj_conv = hk.Conv2D(channels, 1, 1 if self._sk else stride, with_bias=False,
                                       padding="SAME", name="shortcut_conv")
            if not resnet_v2:
                self.proj_bn = _bn("shortcut_batchnorm", bn_config)
        div = 4 if bottleneck else 1
        inner = channels // div
        # v1 zero-initialises the residual branch's last BN scale (as Haiku/BYOL do).
        last_bn_kwargs = {"scale_init": jnp.zeros} if (bottleneck and not resnet_v2) else {}
        if bottleneck:
            mid = (SelectiveKernelConv(inner, stride, bn_config, sk_ratio, name="sk_conv_1") if self._sk
                   else hk.Conv2D(inner, 3, stride, with_bias=False, padding="SAME", name="conv_1"))
            self.layers = [
                (hk.Conv2D(inner, 1, 1, with_bias=False, padding="SAME", name="conv_0"),
                 _bn("batchnorm_0", bn_config)),
                (mid, None if self._sk else _bn("batchnorm_1", bn_config)),
                (hk.Conv2D(channels, 1, 1, with_bias=False, padding="SAME", name="conv_2"),
                 _bn("batchnorm_2", bn_config, **last_bn_kwargs)),
            ]
        else:
            if self._sk:
                raise ValueError("selective kernels need a bottleneck ResNet (50 and deeper)")
            self.layers = [
                (hk.Conv2D(inner, 3, stride, with_bias=False, padding="SAME", name="conv_0"),
                 _bn("batchnorm_0", bn_config)),
                (hk.Conv2D(channels, 3, 1, with_bias=False, padding="SAME", name="conv_1"),
                 _bn("batchnorm_1", bn_config, **last_bn_kwargs)),
            ]

    def _shortcut(self, x: jax.Array, is_training: bool) -> jax.Array:
        if self._sk and self._stride > 1:
            x = hk.avg_pool(x, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="SAME")
        x = self.proj_conv(x)
        return x if self._v2 else self.proj_bn(x, is_training)

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        if self._v2:
            return self._call_v2(x, is_training)
        shortcut = self._shortcut(x, is_training) if self._use_projection else x
        out = x
        for i, (conv, bn) in enumerate(self.layers):
            out = conv(out, is_training) if isinstance(conv, SelectiveKernelConv) else conv(out)
            out = checkpoint_name(out, "conv_out")  # what model.remat='block_save_convs' keeps
            if bn is not None:
                out = bn(out, is_training)
            if i < len(self.layers) - 1:
                out = jax.nn.relu(out)
        return jax.nn.relu(out + shortcut)

    def _call_v2(self, x: jax.Array, is_training: bool) -> jax.Array:
        out = x
        shortcut = x
        for i, (conv, bn) in enumerate(self.layers):
            if bn is not None:
                out = jax.nn.relu(bn(out, is_training))
            if i == 0 and self._use_projection:
                shortcut = self._shortcut(out, is_training)
            out = conv(out, is_training) if isinstance(conv, SelectiveKernelConv) else conv(out)
            out = checkpoint_name(out, "conv_out")  # what model.remat='block_save_convs' keeps
        return out + shortcut


# ``model.remat`` values: what a rematerialised block keeps for the backward pass.
REMAT_POLICIES: Mapping[str, Any] = {
    "none": None,  # no rematerialisation
    "block": jax.checkpoint_policies.nothing_saveable,  # keep block inputs only; recompute the rest
    "block_save_convs": jax.checkpoint_policies.save_only_these_names("conv_out"),  # keep conv outputs
}


class BlockGroup(hk.Module):
    def __init__(self, channels: int, num_blocks: int, stride: int, bottleneck: bool,
                 bn_config: Mapping[str, Any], resnet_v2: bool, sk_ratio: float,
                 remat: str = "none", name: str | None = None):
        super().__init__(name=name)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={remat!r} is not one of {sorted(REMAT_POLICIES)}")
        self._remat = remat
        self.blocks = [
            Block(channels, stride if i == 0 else 1, use_projection=(i == 0), bottleneck=bottleneck,
                  bn_config=bn_config, resnet_v2=resnet_v2, sk_ratio=sk_ratio, name=f"block_{i}")
            for i in range(num_blocks)
        ]

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        for block in self.blocks:
            if self._remat == "none":
                x = block(x, is_training)
            else:  # activations inside the block are recomputed in the backward pass
                x = hk.remat(block, policy=REMAT_POLICIES[self._remat], static_argnums=(1,))(x, is_training)
        return x


def scaled_channels(channels: int, width_multiplier: float) -> int:
    """``channels * width_multiplier``, which must be a whole number: 2 doubles every layer
    (SimCLR's 2x), 0.5 halves it (a narrower net for small images)."""
    scaled = channels * width_multiplier
    if scaled < 1 or scaled != int(scaled):
        raise ValueError(f"{width_multiplier} must give whole channel counts; a {channels}-channel layer "
                         f"would get {scaled:g}")
    return int(scaled)


class ResNet(hk.Module):
    """ResNet encoder returning the globally pooled embedding (no classifier)."""

    def __init__(self, spec: ResNetSpec, width_multiplier: float = 1, resnet_v2: bool = False,
                 sk_ratio: float = 0.0, bn_config: Mapping[str, Any] | None = None, remat: str = "none",
                 stem_max_pool: bool = True, stem_stride: int = 2, name: str | None = None):
        super().__init__(name=name)
        self._stem_max_pool = stem_max_pool
        bn_config = dict(BN_DEFAULTS if bn_config is None else bn_config)
        self._v2 = resnet_v2
        self._sk = sk_ratio > 0
        stem = scaled_channels(spec.stem_channels, width_multiplier)
        if self._sk:
            # SimCLRv2's deep stem (three 3x3 convs) for its selective-kernel nets.
            self.stem = [
                (hk.Conv2D(stem // 2, 3, stem_stride, with_bias=False, padding="SAME", name="initial_conv_0"),
                 _bn("initial_batchnorm_0", bn_config)),
                (hk.Conv2D(stem // 2, 3, 1, with_bias=False, padding="SAME", name="initial_conv_1"),
                 _bn("initial_batchnorm_1", bn_config)),
                (hk.Conv2D(stem, 3, 1, with_bias=False, padding="SAME", name="initial_conv_2"),
                 _bn("initial_batchnorm", bn_config)),
            ]
        else:
            self.stem = [(hk.Conv2D(stem, 7, stem_stride, with_bias=False, padding="SAME", name="initial_conv"),
                          _bn("initial_batchnorm", bn_config))]
        self.groups = [
            BlockGroup(scaled_channels(c, width_multiplier), n, 1 if i == 0 else 2, spec.bottleneck, bn_config,
                       resnet_v2, sk_ratio, remat, name=f"block_group_{i}")
            for i, (c, n) in enumerate(zip(spec.channels_per_group, spec.blocks_per_group))
        ]
        if resnet_v2:
            self.final_bn = _bn("final_batchnorm", bn_config)

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        for i, (conv, bn) in enumerate(self.stem):
            x = conv(x)
            # v2 keeps the stem's last conv un-normalised: blocks pre-activate.
            if not (self._v2 and i == len(self.stem) - 1):
                x = jax.nn.relu(bn(x, is_training))
        if self._stem_max_pool:
            x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
        for group in self.groups:
            x = group(x, is_training)
        if self._v2:
            x = jax.nn.relu(self.final_bn(x, is_training))
        return jnp.mean(x, axis=(1, 2))


class MLP(hk.Module):
    """Linear(+bias) -> BN -> ReLU -> Linear(no bias): BYOL's projector/predictor."""

    def __init__(self, hidden_size: int, output_size: int, bn_config: Mapping[str, Any],
                 name: str | None = None):
        super().__init__(name=name)
        self._hidden = hidden_size
        self._output = output_size
        self._bn_config = bn_config

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        x = hk.Linear(self._hidden, with_bias=True)(x)
        x = _bn("batch_norm", self._bn_config)(x, is_training)
        x = jax.nn.relu(x)
        return hk.Linear(self._output, with_bias=False)(x)


def make_encoder(depth: str, width_multiplier: float, resnet_v2: bool, sk_ratio: float,
                 bn_config: Mapping[str, Any], remat: str = "none", stem_max_pool: bool = True,
                 stem_stride: int = 2) -> ResNet:
    if depth not in RESNET_SPECS:
        raise ValueError(f"model.depth={depth!r} is not one of {sorted(RESNET_SPECS)}")
    return ResNet(RESNET_SPECS[depth], width_multiplier, resnet_v2, sk_ratio, bn_config, remat,
                  stem_max_pool, stem_stride, name=MODULE_NAMES[depth])


def encoder_from_config(model_config: Any, bn_config: Mapping[str, Any], remat: str = "none") -> ResNet:
    """The encoder a ``model`` config describes (pretraining and evaluation build the same one)."""
    return make_encoder(model_config.depth, model_config.width_multiplier, model_config.resnet_v2,
                        model_config.sk_ratio, bn_config, remat, model_config.stem_max_pool,
                        model_config.stem_stride)


def set_compute_dtype(compute_dtype: str) -> None:
    """Mixed precision via Haiku's per-class policies: convolutions and linears
    compute in ``compute_dtype`` with float32 parameters; BatchNorm (statistics
    and EMAs) and every module output stay float32, so losses, softmaxes and the
    queue see float32. ``'float32'`` clears the policies."""
    import jmp

    classes = (ResNet, MLP, SelectiveKernelConv, Block, BlockGroup)
    if compute_dtype == "float32":
        for cls in classes + (hk.BatchNorm,):
            hk.mixed_precision.clear_policy(cls)
        return
    half = jmp.get_policy(f"params=float32,compute={compute_dtype},output=float32")
    for cls in classes:
        hk.mixed_precision.set_policy(cls, half)
    hk.mixed_precision.set_policy(hk.BatchNorm, jmp.get_policy("params=float32,compute=float32,output="
                                                               f"{compute_dtype}"))


def make_network(model_config: Any, num_classes: int, cross_replica_axis: str | None,
                 compute_dtype: str = "float32") -> hk.TransformedWithState:
    """Returns the online (and, with other parameters, target) network.

    ``apply(params, state, None, images, is_training, heads)`` returns a dict with
    ``embedding`` and, per ``heads``, ``projection`` / ``prediction`` / ``logits``.
    The probe's logits read a stop-gradient embedding: it only monitors.
    """
    bn_config = dict(BN_DEFAULTS, decay_rate=model_config.bn_decay, cross_replica_axis=cross_replica_axis)

    def forward(images: jax.Array, is_training: bool,
                heads: Sequence[str] = ("projection", "prediction", "logits")) -> dict[str, jax.Array]:
        set_compute_dtype(compute_dtype)  # at trace time: Haiku reads policies when modules run
        encoder = encoder_from_config(model_config, bn_config, model_config.remat)
        projector = MLP(model_config.projector_hidden_size, model_config.projection_size, bn_config,
                        name="projector")
        predictor = MLP(model_config.predictor_hidden_size, model_config.projection_size, bn_config,
                        name="predictor")
        classifier = hk.Linear(num_classes, name="classifier")
        out = {"embedding": encoder(images, is_training)}
        if "projection" in heads or "prediction" in heads:
            out["projection"] = projector(out["embedding"], is_training)
        if "prediction" in heads:
            out["prediction"] = predictor(out["projection"], is_training)
        if "logits" in heads:
            out["logits"] = classifier(jax.lax.stop_gradient(out["embedding"]))
        return out

    return hk.transform_with_state(forward)
