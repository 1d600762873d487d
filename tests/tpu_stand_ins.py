"""Stand-ins for what a TPU pod launch talks to: ``gcloud`` and, on the workers, PyPI's ``uv``.

- ``gcloud`` (``fake_gcloud.py``): queued resources as a state machine, a slice of VMs
  whose home directories are folders that start empty, ``scp`` that copies and ``ssh``
  that runs each command for real, with ``bash -c``, in the worker's home and a clean
  environment (the image's PATH, no variable of the test's).
- PyPI: a wheelhouse that ``pip install --user uv==...`` on a worker installs from. Its
  ``uv`` runs what uv would with what is on this machine: ``uv venv`` makes a real
  virtual environment on this machine's Python 3.11, which it offers as the uv-managed
  3.11, while the image's own ``python3`` is, as on the TPU images, 3.10;
  ``uv pip install`` resolves each pinned requirement against the packages installed
  here, refusing any whose ``Requires-Python`` the environment's Python does not meet.
  TPU-only extras (``jax[tpu]``'s libtpu) are not on this machine and are taken as given.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sys
import sysconfig
import zipfile
from pathlib import Path

UV_VERSION = "0.13.8"
IMAGE_PYTHON = "3.10.12"  # python3 on tpu-ubuntu2204-base and the v2-alpha-tpuv5/v6e images (Ubuntu 22.04)

UV_MODULE = '''
import os, re, subprocess, sys
from importlib import metadata

CONFIG = {config}


def _opt(args, name):
    if name in args:
        i = args.index(name)
        value = args[i + 1]
        del args[i:i + 2]
        return value
    return None


def _flag(args, name):
    if name in args:
        args.remove(name)
        return True
    return False


def _version(text):
    return tuple(int(p) for p in re.findall(r"\\d+", text)[:3])


def _satisfies(version, spec):
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, want = re.match(r"(>=|<=|==|!=|>|<|~=)\\s*(.+)", clause).groups()
        v, w = _version(version), _version(want.replace(".*", ""))
        v = v[:len(w)] if want.endswith(".*") else v
        ok = dict(zip([">=", "<=", "==", "!=", ">", "<", "~="],
                      [v >= w, v <= w, v == w, v != w, v > w, v < w, v >= w]))[op]
        if not ok:
            return False
    return True


def venv(args):
    quiet = _flag(args, "--quiet")
    python, preference = _opt(args, "--python"), _opt(args, "--python-preference") or "managed"
    target = args[-1]
    image = CONFIG["image_python"]
    if python is None or (preference in ("system", "only-system") and _satisfies(image, ">=" + python)):
        version = image  # the first python3 on PATH: the image's own
    elif preference == "only-system":
        print(f"error: No interpreter found for Python {{python}} in virtual environments or search path",
              file=sys.stderr)
        return 2
    elif CONFIG["managed_python"].startswith(python):
        version = CONFIG["managed_python"]  # a managed CPython of that version (here: this machine's)
    else:
        print(f"error: No download found for request: cpython-{{python}}", file=sys.stderr)
        return 2
    subprocess.run([CONFIG["base_python"], "-m", "venv", "--without-pip", target], check=True)
    with open(os.path.join(target, "uv-stand-in-python"), "w") as f:
        f.write(version)
    if not quiet:
        print(f"Using CPython {{version}}; creating virtual environment at: {{target}}")
    with open(CONFIG["record"], "a") as f:
        f.write(f"venv --python {{python}} --python-preference {{preference}} -> {{version}}\\n")
    return 0


def pip_install(args):
    quiet = _flag(args, "--quiet")
    python = _opt(args, "--python")
    files = []
    while "-r" in args:
        files.append(_opt(args, "-r"))
    lines = [line.split("#")[0].strip() for f in files for line in open(f)] + args
    env = os.path.dirname(os.path.dirname(python))
    version = open(os.path.join(env, "uv-stand-in-python")).read().strip()
    here = {{re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d
            for d in metadata.distributions(path=[CONFIG["site_packages"]])}}
    wanted = [re.match(r"([A-Za-z0-9_.\\-]+)(\\[[^\\]]*\\])?==(\\S+)$", line) for line in lines if line]
    for line, m in zip([x for x in lines if x], wanted):
        if m is None:
            print(f"error: the stand-in resolves exact pins only, not {{line!r}}", file=sys.stderr)
            return 2
        name, extras, pin = re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(2), m.group(3)
        dist = here.get(name)
        if dist is None or dist.version != pin:
            print(f"error: No solution found: {{name}}=={{pin}} is not available", file=sys.stderr)
            return 1
        needs = dist.metadata.get("Requires-Python")
        if needs and not _satisfies(version, needs):
            print(f"error: Because the current Python version ({{version}}) does not satisfy Python{{needs}} "
                  f"and {{name}}=={{pin}} depends on Python{{needs}}, we can conclude that {{name}}=={{pin}} "
                  "cannot be used.", file=sys.stderr)
            return 1
    site = os.path.join(env, "lib", "python" + ".".join(version.split(".")[:2]), "site-packages")
    if not os.path.isdir(site):  # the stand-in's environments all run this machine's 3.11
        site = next(os.path.join(env, "lib", d, "site-packages") for d in os.listdir(os.path.join(env, "lib")))
    with open(os.path.join(site, "uv_stand_in_packages.pth"), "w") as f:
        f.write(CONFIG["site_packages"] + "\\n")
    with open(CONFIG["record"], "a") as f:
        f.write(f"pip install --python {{python}} {{' '.join(x for x in lines if x and '==' in x and 'jax' in x)}}\\n")
    if not quiet:
        print(f"Installed {{len(wanted)}} packages")
    return 0


def main():
    args = sys.argv[1:]
    if args == ["--version"]:
        print("uv {version}")
        return 0
    if args[:1] == ["venv"]:
        return venv(args[1:])
    if args[:2] == ["pip", "install"]:
        return pip_install(args[2:])
    print(f"uv stand-in: {{args}} is not supported", file=sys.stderr)
    return 2
'''


def build_uv_wheel(wheelhouse: Path, record: Path) -> Path:
    """``uv-<UV_VERSION>-py3-none-any.whl`` whose ``uv`` is the stand-in (see the module doc)."""
    config = dict(site_packages=sysconfig.get_paths()["purelib"], base_python=sys._base_executable,
                  managed_python=".".join(map(str, sys.version_info[:3])), image_python=IMAGE_PYTHON,
                  record=str(record))
    files = {
        "uv_stand_in.py": UV_MODULE.format(config=repr(config), version=UV_VERSION),
        f"uv-{UV_VERSION}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: uv\nVersion: {UV_VERSION}\n",
        f"uv-{UV_VERSION}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: stand-in\nRoot-Is-Purelib: true\n"
                                            "Tag: py3-none-any\n",
        f"uv-{UV_VERSION}.dist-info/entry_points.txt": "[console_scripts]\nuv = uv_stand_in:main\n",
    }
    rows = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        rows.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"uv-{UV_VERSION}.dist-info/RECORD"] = "\n".join(rows + [f"uv-{UV_VERSION}.dist-info/RECORD,,"]) + "\n"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    path = wheelhouse / f"uv-{UV_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def image_bin(folder: Path) -> Path:
    """The TPU image's own commands the workers rely on: ``python3`` (with pip) and the base tools."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "python3"
    if not link.exists():
        link.symlink_to(sys._base_executable)
    return folder


def write_config(fake_dir: Path, workers: int, wheelhouse: Path, machine_env: dict, on_create: list[str],
                 create_failures: int = 0) -> None:
    """The fake gcloud's settings (``fake_gcloud.py``)."""
    fake_dir.mkdir(parents=True, exist_ok=True)
    config = dict(workers=workers, on_create=on_create, image_path=f"{image_bin(fake_dir / 'image_bin')}:/usr/bin:/bin",
                  worker_env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_CONFIG_FILE": os.devnull,
                              "PIP_DISABLE_PIP_VERSION_CHECK": "1", **machine_env})
    (fake_dir / "config.json").write_text(json.dumps(config))
    (fake_dir / "create_failures").write_text(str(create_failures))


def worker_homes(fake_dir: Path) -> list[Path]:
    """The current slice's workers' home directories."""
    generation = (fake_dir / "generation").read_text().strip() if (fake_dir / "generation").exists() else "0"
    workers = json.loads((fake_dir / "config.json").read_text())["workers"]
    return [fake_dir / f"slice{generation}" / f"worker{i}" for i in range(workers)]


def kill_workers(fake_dir: Path) -> None:
    """What a VM that goes away does to its processes: every run's process group, SIGKILL."""
    for home in worker_homes(fake_dir):
        for pidfile in home.glob("semppl/runs/*/pid"):
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def preempt(fake_dir: Path) -> None:
    """A spot slice taken back: its VMs go (processes killed), the queued resource is SUSPENDED."""
    kill_workers(fake_dir)
    (fake_dir / "qr").write_text("SUSPENDED")
    (fake_dir / "node").write_text("PREEMPTED")
