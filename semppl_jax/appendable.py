"""A text file that only grows, written so that a bucket can hold it.

A local file is appended in place. An object on a bucket cannot be appended: a
writer that appends and flushes re-uploads the whole object each time, so a log
or ``metrics.jsonl`` would cost uploads quadratic in its length. On a bucket the
file is therefore a folder of numbered parts, ``<name>.parts/<number>``: each
flush rewrites only the current part, which is closed at ``PART_BYTES`` (a new
writer, e.g. a resumed run, starts a new one). :func:`read_text` reads either form.
"""

from __future__ import annotations

import os

from etils import epath

from semppl_jax.paths import is_uri, with_retries

PART_BYTES = 256 * 1024
PARTS_SUFFIX = ".parts"


def parts_dir(path: epath.Path) -> epath.Path:
    return path.parent / (path.name + PARTS_SUFFIX)


def _parts(path: epath.Path) -> list[epath.Path]:
    folder = parts_dir(path)
    return sorted(folder.glob("[0-9]" * 8)) if folder.exists() else []


def read_text(path: str | os.PathLike) -> str:
    """The whole file: the plain file, then its parts in order (either may be absent)."""
    path = epath.Path(path)
    text = path.read_text() if path.exists() else ""
    return text + "".join(p.read_text() for p in _parts(path))


def exists(path: str | os.PathLike) -> bool:
    path = epath.Path(path)
    return path.exists() or bool(_parts(path))


def rewrite(path: str | os.PathLike, text: str) -> None:
    """Replaces the whole file by ``text`` (a resume that drops records logged after its checkpoint)."""
    path = epath.Path(path)
    for part in _parts(path):
        part.unlink()
    if is_uri(path):
        if text:
            (parts_dir(path) / f"{0:08d}").write_text(text)
        if path.exists():
            path.unlink()
        return
    tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)


class AppendOnlyFile:
    """``write`` buffers, ``flush`` makes the text durable: an append locally, a part on a bucket."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remote = is_uri(self.path)
        self._pending: list[str] = []
        # A local file is appended through its descriptor, bytes at a time, so a write retried
        # after a failure goes on from what landed (a buffered file would write it twice).
        self._local = None if self._remote else os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self._remote:
            existing = _parts(self.path)
            self._number = int(existing[-1].name) + 1 if existing else 0
            self._part = ""

    def write(self, text: str) -> None:
        self._pending.append(text)

    def flush(self) -> None:
        text = "".join(self._pending)
        self._pending.clear()
        if not text:
            return
        if self._local is not None:
            data, done = text.encode(), [0]

            def append() -> None:
                while done[0] < len(data):
                    done[0] += os.write(self._local, data[done[0]:])

            with_retries(append, str(self.path))
            return
        self._part += text
        folder = parts_dir(self.path)

        def write_part() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{self._number:08d}").write_text(self._part)  # one object, at most PART_BYTES + a flush

        with_retries(write_part, str(folder / f"{self._number:08d}"))
        if len(self._part.encode()) >= PART_BYTES:
            self._number, self._part = self._number + 1, ""

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._local is not None:
                os.close(self._local)
                self._local = None
