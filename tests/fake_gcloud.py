"""Stand-in for the ``gcloud`` commands ``launch/tpu_pod.sh`` sends (``tpu_stand_ins.py``).

State lives in ``$FAKE_DIR``: ``qr`` (the queued resource's state; absent: none),
``qr_next`` (the states it moves through, one per ``describe``), ``node`` (the TPU
node's state), ``generation`` (a slice created anew has new, empty VMs) and
``calls.log`` (every call). ``ssh`` runs each command for real with ``bash -c`` in
the worker's home, in a clean environment: the image's PATH and the machine's
settings from ``config.json``, nothing of the caller's.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import tpu_stand_ins  # noqa: E402

FAKE = Path(os.environ["FAKE_DIR"])
CONFIG = json.loads((FAKE / "config.json").read_text())


def read(name: str, default: str = "") -> str:
    path = FAKE / name
    return path.read_text().strip() if path.exists() else default


def take_flags(args: list[str]) -> dict[str, str]:
    """Removes ``--name value`` / ``--name=value`` / ``--flag`` options; returns them."""
    flags, rest = {}, []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            if not eq and name in ("zone", "project", "node-id", "accelerator-type", "runtime-version", "worker",
                                   "command", "format"):
                value, i = args[i + 1], i + 1
            flags[name] = value if (eq or value) else "true"
        else:
            rest.append(a)
        i += 1
    args[:] = rest
    return flags


def fail(message: str, code: int = 1) -> None:
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(code)


def queued_resources(verb: str, name: str, flags: dict) -> None:
    if verb == "create":
        if read("qr"):
            fail(f"(gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: {name}")
        left = int(read("create_failures", "0"))
        if left > 0:
            (FAKE / "create_failures").write_text(str(left - 1))
            fail("(gcloud.compute.tpus.queued-resources.create) RESOURCE_EXHAUSTED: There is no more capacity "
                 "in the zone; you can try in another zone or later")
        states = CONFIG["on_create"]
        (FAKE / "qr").write_text(states[0])
        (FAKE / "qr_next").write_text("\n".join(states[1:]))
        (FAKE / "node").write_text("READY")
        (FAKE / "generation").write_text(str(int(read("generation", "-1")) + 1))
        for home in tpu_stand_ins.worker_homes(FAKE):
            home.mkdir(parents=True)
        return
    if verb == "describe":
        state = read("qr")
        if not state:
            fail(f"NOT_FOUND: queued resource {name}")
        upcoming = [s for s in read("qr_next").splitlines() if s]
        if upcoming:
            (FAKE / "qr").write_text(upcoming[0])
            (FAKE / "qr_next").write_text("\n".join(upcoming[1:]))
        print(state)
        return
    if verb == "delete":
        tpu_stand_ins.kill_workers(FAKE)
        for f in ("qr", "qr_next", "node"):
            (FAKE / f).unlink(missing_ok=True)
        return
    fail(f"fake gcloud: queued-resources {verb} is not supported", 2)


def workers(flags: dict) -> list[Path]:
    homes = tpu_stand_ins.worker_homes(FAKE)
    return homes if flags.get("worker", "all") == "all" else [homes[int(flags["worker"])]]


def run_on(home: Path, command: str, results: dict) -> None:
    env = dict(HOME=str(home), PATH=CONFIG["image_path"], LANG="C.UTF-8", USER="tpu", **CONFIG["worker_env"])
    done = subprocess.run(["bash", "-c", command], cwd=home, env=env)
    results[home] = done.returncode


def tpu_vm(verb: str, args: list[str], flags: dict) -> None:
    if verb == "describe":
        if read("qr") != "ACTIVE" and read("node") in ("", "READY"):
            fail(f"NOT_FOUND: node {args[0]}")
        if flags.get("format") == "value(state)":
            print(read("node", "READY"))
        elif flags.get("format") == "value(networkEndpoints.ipAddress)":
            print(";".join(f"10.0.0.{i + 2}" for i in range(CONFIG["workers"])))
        return
    if verb == "scp":
        *sources, target = args
        dest = target.split(":", 1)[1]
        for home in workers(flags):
            folder = home / dest
            folder.mkdir(parents=True, exist_ok=True)
            for s in sources:
                shutil.copy(s, folder / Path(s).name)
        return
    if verb == "ssh":
        results: dict = {}
        threads = [threading.Thread(target=run_on, args=(h, flags["command"], results)) for h in workers(flags)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad = [code for code in results.values() if code]
        if bad:
            fail(f"(gcloud.compute.tpus.tpu-vm.ssh) [{bad[0]}] a worker's command failed", bad[0])
        return
    fail(f"fake gcloud: tpu-vm {verb} is not supported", 2)


def main() -> None:
    args = sys.argv[1:]
    with open(FAKE / "calls.log", "a") as f:
        f.write(json.dumps(args) + "\n")
    flags = take_flags(args)
    if args[:3] == ["compute", "tpus", "queued-resources"]:
        queued_resources(args[3], args[4], flags)
    elif args[:3] == ["compute", "tpus", "tpu-vm"]:
        tpu_vm(args[3], args[4:], flags)
    else:
        fail(f"fake gcloud: {args} is not supported", 2)


if __name__ == "__main__":
    main()
