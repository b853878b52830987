"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

Every writer of the project goes through `atomic_path`: a hidden temp file next to the target,
renamed over it once complete. The temp file is created with the mode a plain `open` gives
(0666 less the umask), not `mkstemp`'s 0600, because the rename keeps it and datasets, reports
and checkpoints are meant to be shared.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _create_temp(path: Path) -> tuple[Path, int]:
    """A fresh hidden temp file next to `path`, and the mode the umask gave it."""
    for _ in range(100):
        # hidden `.name.*.tmp`: no glob of finished files (data/train-*) ever picks it up
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except FileExistsError:
            continue
        try:
            mode = os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"no free temp name next to {path}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path for a writer to fill (it may reopen it); renamed over `path` on success.

    >>> with atomic_path("out/model.safetensors") as tmp:  # doctest: +SKIP
    ...     save_model(model, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp(path)
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with a 0600 one of their own
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
