"""Reading the checkpoints of a live run: the writer deletes old steps while a reader reads them."""

import os
import shutil
import threading

import jax
import numpy as np
import pytest

from experiments import tiny
from semppl_jax import checkpointing, update_step

# A read whose step is deleted under it leaves Orbax's pending coroutines to be collected
# with the error they met (also during a later test of this file): expected, and retried
# from a fresh choice of step.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def saved():
    config = tiny.get_config()
    state = update_step.init_state(config, jax.random.key(0), 10, 100, 10)
    return config, state, checkpointing.run_signature(config, 10, 100)


def _writer(directory, keep=1):
    return checkpointing.Checkpointer(str(directory / "checkpoints"), keep=keep, every_steps=1, async_save=False)


def test_reading_while_a_live_run_saves_and_deletes(tmp_path, saved):
    """A run saving every step with ``keep=1`` deletes each step right after the next
    is written; ``latest_step``, ``restore_encoder`` and ``restore_state`` beside it
    return complete steps that never go backwards (Orbax alone fails on a vanished step)."""
    config, state, meta = saved
    writer = _writer(tmp_path)
    writer.save(0, state, meta)
    last = 15
    done = threading.Event()

    def write() -> None:
        try:
            for step in range(1, last + 1):
                writer.save(step, state, meta)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen = []
    try:
        while not done.is_set():
            seen.append(checkpointing.latest_step(str(tmp_path)))
            if len(seen) % 2:
                params, _, step = checkpointing.restore_encoder(str(tmp_path), config)
                for module, leaves in params.items():
                    for name, value in leaves.items():
                        np.testing.assert_array_equal(value, state.online_params[module][name])
            else:
                _, step = checkpointing.restore_state(str(tmp_path), config)
            seen.append(step)
    finally:
        thread.join()
        writer.close()
    assert len(seen) >= 6, f"only {len(seen) // 2} reads overlapped the writer"
    assert None not in seen and seen == sorted(seen), seen
    assert checkpointing.latest_step(str(tmp_path)) == last


def test_a_step_deleted_mid_read_is_read_again_from_the_newest(tmp_path, saved, monkeypatch):
    """Deterministic version of the race: the first read finds its step deleted (as a
    writer with ``keep=1`` does after saving the next); the read restarts on the newer one."""
    config, state, meta = saved
    writer = _writer(tmp_path, keep=2)
    writer.save(1, state, meta)
    writer.save(2, state, meta)
    writer.close()
    real_restore = checkpointing.ocp.Checkpointer.restore
    calls = []

    def restore_after_deletion(self, directory, *args, **kwargs):
        if str(directory).endswith("state") and not calls:
            calls.append(directory)
            shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "3")
            shutil.rmtree(tmp_path / "checkpoints" / "2")
        return real_restore(self, directory, *args, **kwargs)

    monkeypatch.setattr(checkpointing.ocp.Checkpointer, "restore", restore_after_deletion)
    _, step = checkpointing.restore_state(str(tmp_path), config)
    assert calls and step == 3


def test_a_damaged_checkpoint_is_an_error_not_a_retry(tmp_path, saved):
    """Only a step that vanished is retried: a damaged one that is still there raises at once."""
    config, state, meta = saved
    writer = _writer(tmp_path)
    writer.save(1, state, meta)
    writer.close()
    damaged = 0
    for root, _, files in os.walk(tmp_path / "checkpoints" / "1" / "state"):
        if os.path.basename(root) == "d":  # the OCDBT data files
            for name in files:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(8)
                damaged += 1
    assert damaged
    with pytest.raises(Exception) as caught:
        checkpointing.restore_state(str(tmp_path), config)
    assert "deleted while being read" not in str(caught.value)
    assert checkpointing.latest_step(str(tmp_path)) == 1


def test_a_relative_workdir_is_read(tmp_path, saved, monkeypatch):
    """``run_demo.sh``'s default workdir is relative; Orbax refuses relative paths."""
    config, state, meta = saved
    writer = _writer(tmp_path / "run")
    writer.save(3, state, meta)
    writer.close()
    monkeypatch.chdir(tmp_path)
    params, _, step = checkpointing.restore_encoder("run", config)
    assert step == 3
    for module, leaves in params.items():
        for name, value in leaves.items():
            np.testing.assert_array_equal(value, state.online_params[module][name])
    assert checkpointing.restore_state("run", config)[1] == 3
