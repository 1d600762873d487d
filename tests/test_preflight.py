"""``--mode=check``, the launcher's preflight, run as a launch runs it: real processes.

With one and with two processes (jax.distributed on localhost) it reports every
check; it fails with status 78, naming the check, on a workdir one host cannot
write, a split that does not exist and a batch that does not fit the device.
"""

import os
import subprocess
import sys

import pytest

from semppl_jax import preflight
from tests.conftest import REPO
from tests.test_multihost_launcher import _env as launcher_env
from tests.test_multiprocess import free_port

CHECKS = ("python", "jax", "devices", "config", "data", "labels", "step", "records", "workdir")


def _env() -> dict:
    return launcher_env(4)  # 4 CPU devices a process, the suite's compilation cache


def read_only(workdir) -> list[str]:
    """A command prefix under which ``workdir`` is a read-only filesystem (root ignores modes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        workdir.chmod(0o555)
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, str(workdir)]


def check(workdir, *args: str, processes: int = 1, prefix: dict | None = None) -> list[tuple[int, str]]:
    """(exit status, output) of each process of ``--mode=check``; ``prefix``: a command
    prefix by process (e.g. ``read_only``)."""
    port = free_port()
    procs = []
    for i in range(processes):
        multi = [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                 f"--process_id={i}", f"--expect_processes={processes}"] if processes > 1 else []
        cmd = [*(prefix or {}).get(i, []), sys.executable, "-m", "semppl_jax.main", "--mode=check",
               "--config=experiments/tiny.py", f"--workdir={workdir}", *multi, *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return [(p.wait(timeout=600), p.communicate()[0]) for p in procs]


def rows(output: str) -> dict[str, list[str]]:
    """The report's rows by check name."""
    table = output[output.index("preflight: "):]
    found: dict[str, list[str]] = {}
    for line in table.splitlines()[2:]:
        name = line.split()[0] if line.startswith("  ") else None
        if name in CHECKS:
            found.setdefault(name, []).append(line)
    return found


def test_two_processes_agree_and_one_report_is_printed(tmp_path):
    results = check(tmp_path / "run", processes=2)
    assert [c for c, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    report = rows(results[0][1])
    assert set(report) == set(CHECKS) and "preflight: all checks passed" in results[0][1]
    assert "8 cpu devices, 4 on each of 2 processes" in report["devices"][0]
    assert all(r[0].split()[1] == "all" for r in report.values())  # every check alike on both hosts
    assert "preflight:" not in results[1][1].replace("preflight.py", "")  # the table is process 0's


def test_a_workdir_one_host_cannot_write_fails_on_every_host(tmp_path):
    workdir = tmp_path / "run"
    results = check(workdir, processes=2, prefix={1: read_only(workdir)})
    assert [c for c, _ in results] == [preflight.FAILED_EXIT_CODE] * 2, results[0][1][-3000:]
    failed = [r for r in rows(results[0][1])["workdir"] if " FAIL " in r]
    assert failed and str(workdir) in " ".join(failed), results[0][1][-3000:]
    assert "nothing was trained (exit status 78)" in results[0][1]


def test_a_missing_split_is_named(tmp_path):
    [(code, out)] = check(tmp_path / "run", "--config.dataset.eval_split=validation")
    assert code == preflight.FAILED_EXIT_CODE
    report = rows(out)
    assert " FAIL " in report["data"][0] and "not 'validation'" in report["data"][0]
    assert "not checked: the data was not found" in report["step"][0]


@pytest.mark.parametrize("batch", [8192])
def test_a_batch_that_does_not_fit_is_named_with_remedies(tmp_path, batch):
    """1,024 images of 224 pixels a device: far more than a CPU device's share of host memory."""
    [(code, out)] = check(tmp_path / "run", "--config.views.large_size=224", f"--config.training.batch_size={batch}",
                          "--config.dataset.synthetic_size=8192")
    assert code == preflight.FAILED_EXIT_CODE, out[-3000:]
    report = rows(out)
    assert set(report) == set(CHECKS)  # one process reports every check
    step = report["step"][0]
    assert " FAIL " in step and "DoesNotFitError" in step and "remat=block" in step
    assert all(" ok " in r[0] for name, r in report.items() if name != "step")
    assert "4 cpu devices, 1 process" in report["devices"][0] and "labelled images of 8192" in report["labels"][0]
    assert not (tmp_path / "run" / ".preflight").exists()
