"""``experiments/folder.py``: each value read from a folder (``folder_preset.py``) when the run
starts, the config it makes validates, the user's overrides win, and a pod lists the folder once."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from experiments import folder
from semppl_jax import config_checks, default_config, folder_preset
from tests.conftest import REPO
from tests.test_multiprocess import free_port


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
    config = folder_preset.resolve(folder.get_config(write_folder(tmp_path, side=21, grey=True)), None)
    printed = capsys.readouterr().out
    assert "12 training images, 5 labelled in 2 classes; typical side 21 px, grey" in printed
    assert config.views.large_size == config.views.eval_size == 20  # the median side to a multiple of 4
    assert (config.augment.saturation, config.augment.hue) == (0.0, 0.0)
    assert config.augment.flip and config.eval.flip
    assert (config.model.depth, config.model.width_multiplier, config.model.stem_max_pool) == ("small", 0.5, False)
    assert config.training.num_epochs == math.ceil(folder_preset.IMAGES_SEEN / 12)
    assert config.semppl.queue_size == 64  # 2 views x 5 labelled x 2 epochs is below the floor
    assert config.semppl.queue_size % config.views.num_large == 0
    config_checks.resolve_batch(config, num_devices=1, num_train=12)
    assert config.training.batch_size == 1  # an eighth of 12 images
    config_checks.validate(config, num_devices=1, num_train=12, num_classes=2)
    assert config.dataset.calibration_per_class == 1  # the class with 2 labelled images keeps one in the loss
    assert config.semppl.min_vote_precision == folder_preset.FEW_LABELS_PRECISION == 0.7  # 1 a class in the loss
    for reason in ("views:", "augmentation:", "network:", "schedule:", "queue:", "calibration fold: 1 labelled",
                   "vote gate: positives from votes 70% right, not 90% (1 labelled a class in the loss"):
        assert f"[folder.py]   {reason}" in printed


def test_colour_is_read_from_the_images_and_upright_drops_flips(tmp_path, capsys):
    config = folder_preset.resolve(folder.get_config(write_folder(tmp_path, side=40, grey=False) + ",upright"), None)
    assert "grey" not in capsys.readouterr().out.split("\n")[0]
    base = default_config.base_config()
    assert (config.augment.saturation, config.augment.hue) == (base.augment.saturation, base.augment.hue)
    assert not config.augment.flip and not config.eval.flip
    assert config.views.large_size == 40
    assert folder_preset.resolve(folder.get_config(str(tmp_path) + ",grey"), None).augment.hue == 0.0  # said


@pytest.mark.parametrize("images,side,size,depth,pool,precision", [
    (4_000, 28, 28, "small", False, 0.7),  # 4 labelled a class, 1 in the fold: 3 in the loss
    (50_000, 32, 32, "resnet18", False, 0.9),  # many small images: a ResNet-18 that keeps their resolution
    (50_000, 500, 112, "resnet18", True, 0.9),
    (1_281_167, 400, 224, "resnet50", True, 0.9),
])
def test_views_network_and_schedule_follow_the_folder_size(images, side, size, depth, pool, precision):
    config = default_config.base_config()
    figures = folder_preset.Figures(images, labelled=images // 100, classes=10, side=side, grey=False,
                                    fewest_labelled=images // 1000)
    lines = folder_preset.choose(config, figures, grey=False, upright=False)
    assert config.dataset.calibration_per_class == max(1, round(images // 1000 / 10))  # a tenth, at least one
    assert config.views.large_size == size and config.views.small_size == size // 2
    assert (config.model.depth, config.model.stem_max_pool) == (depth, pool)
    assert config.training.num_epochs == max(30, math.ceil(folder_preset.IMAGES_SEEN / images))
    assert config.semppl.queue_size == max(64, 4 * (images // 100))
    assert config.semppl.min_vote_precision == precision
    assert len(lines) == 7 and lines[-1].startswith(f"vote gate: positives from votes {precision:.0%} right")
    config_checks.resolve_batch(config, num_devices=8, num_train=images)
    config_checks.validate(config, num_devices=8, num_train=images, num_classes=10)


def test_a_missing_folder_or_an_unknown_option_is_refused():
    with pytest.raises(ValueError, match="needs the folder"):
        folder.get_config(None)
    with pytest.raises(ValueError, match=r"unknown options \['gray'\]"):
        folder.get_config("/somewhere,gray")


def test_the_config_reads_nothing_until_the_run_starts_and_the_users_overrides_win(tmp_path, capsys):
    config = folder.get_config(str(tmp_path / "not_yet"))  # built on every host: no listing, no image read
    assert folder_preset.needs_resolving(config) and config.views.large_size == default_config.base_config(
        ).views.large_size
    with pytest.raises(FileNotFoundError, match="no such directory"):
        folder_preset.resolve(config, None)
    config = folder.get_config(write_folder(tmp_path, side=40, grey=False))
    folder_preset.resolve(config, None, {"views.large_size": 32, "semppl.queue_size": 100,
                                         "semppl.min_vote_precision": 0.9})
    assert (config.views.large_size, config.views.eval_size, config.semppl.queue_size) == (32, 40, 100)
    assert config.semppl.min_vote_precision == 0.9  # the preset's 0.7 for so few labels, overridden
    assert "[folder.py]   as given: views.large_size=32" in capsys.readouterr().out
    before = config.to_json()
    folder_preset.resolve(config, None)  # resolved once: a second call changes nothing
    assert config.to_json() == before and not folder_preset.needs_resolving(config)


WORKER = """
import json, sys
import jax
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
from experiments import folder
from semppl_jax import datasets, folder_listing, folder_preset
listings, sampled = [], []
list_files, typical_image = folder_listing.list_files, folder_preset.typical_image
folder_listing.list_files = lambda top: listings.append(top) or list_files(top)
folder_preset.typical_image = lambda *a: sampled.append(1) or typical_image(*a)
config, index = folder.get_config(sys.argv[3]), sys.argv[4]
with folder_listing.one_listing_a_run():  # what the launcher does: the preset's figures, then the data
    folder_preset.resolve(config, index, {"training.batch_per_device": 2})
    source = datasets.load_split(config, "train", index)
json.dump(dict(listings=listings, sampled=len(sampled), images=source.num_ids, config=config.to_json()),
          open(sys.argv[5], "w"))
jax.distributed.shutdown()
"""


def test_two_processes_list_the_folder_once_and_process_zero_alone_reads_the_sample(tmp_path):
    root = write_folder(tmp_path / "photos", side=29, grey=False)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO))
    port, outs = free_port(), [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), root,
                               str(tmp_path / "workdir" / "data_index"), str(outs[i])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    zero, one = (json.loads(o.read_text()) for o in outs)
    assert zero["listings"] == [f"{root}/train"] and one["listings"] == []  # once a run, by process 0
    assert (zero["sampled"], one["sampled"]) == (1, 0)
    assert zero["config"] == one["config"] and zero["images"] == one["images"] == 12
    chosen = json.loads(zero["config"])
    assert chosen["views"]["large_size"] == 28 and chosen["training"]["batch_per_device"] == 2
    assert sum("[folder.py]" in line for line in logs[1].splitlines()) == 0  # printed by process 0 alone
