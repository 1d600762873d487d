"""``experiments/folder.py``: each value it reads from a folder, and the config it makes validates."""

import math

import numpy as np
import pytest
from PIL import Image

from experiments import folder
from semppl_jax import config_checks, default_config


def write_folder(root, side, grey, labelled=(3, 2), unlabelled=7):
    """``root/train/<class>/*`` and ``root/train/unlabelled/*`` of ``side``-pixel-high images."""
    rng = np.random.default_rng(side)
    paths = [root / "train" / f"c{c}" / f"{i}.png" for c, n in enumerate(labelled) for i in range(n)]
    paths += [root / "train" / "unlabelled" / f"u{i}.png" for i in range(unlabelled)]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (side, side + 9, 1 if grey else 3), np.uint8)
        Image.fromarray(np.repeat(pixels, 3, -1) if grey else pixels).save(path)
    return str(root)


def test_a_small_grey_folder_gets_small_views_no_colour_and_a_full_schedule(tmp_path, capsys):
    config = folder.get_config(write_folder(tmp_path, side=21, grey=True))
    printed = capsys.readouterr().out
    assert "12 training images, 5 labelled in 2 classes; typical side 21 px, grey" in printed
    assert config.views.large_size == config.views.eval_size == 20  # the median side to a multiple of 4
    assert (config.augment.saturation, config.augment.hue) == (0.0, 0.0)
    assert config.augment.flip and config.eval.flip
    assert (config.model.depth, config.model.width_multiplier, config.model.stem_max_pool) == ("small", 0.5, False)
    assert config.training.num_epochs == math.ceil(folder.IMAGES_SEEN / 12)
    assert config.semppl.queue_size == 64  # 2 views x 5 labelled x 2 epochs is below the floor
    assert config.semppl.queue_size % config.views.num_large == 0
    config_checks.resolve_batch(config, num_devices=1, num_train=12)
    assert config.training.batch_size == 1  # an eighth of 12 images
    config_checks.validate(config, num_devices=1, num_train=12, num_classes=2)
    for reason in ("views:", "augmentation:", "network:", "schedule:", "queue:"):
        assert f"[folder.py]   {reason}" in printed


def test_colour_is_read_from_the_images_and_upright_drops_flips(tmp_path, capsys):
    config = folder.get_config(write_folder(tmp_path, side=40, grey=False) + ",upright")
    assert "grey" not in capsys.readouterr().out.split("\n")[0]
    base = default_config.base_config()
    assert (config.augment.saturation, config.augment.hue) == (base.augment.saturation, base.augment.hue)
    assert not config.augment.flip and not config.eval.flip
    assert config.views.large_size == 40
    assert folder.get_config(str(tmp_path) + ",grey").augment.hue == 0.0  # said by the user


@pytest.mark.parametrize("images,side,size,depth,pool", [
    (4_000, 28, 28, "small", False),
    (50_000, 32, 32, "resnet18", False),  # many small images: a ResNet-18 that keeps their resolution
    (50_000, 500, 112, "resnet18", True),
    (1_281_167, 400, 224, "resnet50", True),
])
def test_views_network_and_schedule_follow_the_folder_size(images, side, size, depth, pool):
    config = default_config.base_config()
    lines = folder._choose(config, images, labelled=images // 100, side=side, grey=False, upright=False)
    assert config.views.large_size == size and config.views.small_size == size // 2
    assert (config.model.depth, config.model.stem_max_pool) == (depth, pool)
    assert config.training.num_epochs == max(30, math.ceil(folder.IMAGES_SEEN / images))
    assert config.semppl.queue_size == max(64, 4 * (images // 100))
    assert len(lines) == 5
    config_checks.resolve_batch(config, num_devices=8, num_train=images)
    config_checks.validate(config, num_devices=8, num_train=images, num_classes=10)


def test_a_missing_folder_or_an_unknown_option_is_refused():
    with pytest.raises(ValueError, match="needs the folder"):
        folder.get_config(None)
    with pytest.raises(ValueError, match=r"unknown options \['gray'\]"):
        folder.get_config("/somewhere,gray")
