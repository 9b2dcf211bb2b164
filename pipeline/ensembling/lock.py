"""One search at a time per output folder: the lock a search holds while it writes there."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import PipelineError

LOCK = ".search.lock"        # held (fcntl.flock) by the search that writes the output folder


@contextlib.contextmanager
def search_lock(out_dir: Path) -> Iterator[Path]:
    """Hold ``out_dir/.search.lock`` (``fcntl.flock``, released by the kernel if the holder
    dies) while a search writes ``out_dir``: its study, records and outputs. The file holds
    the holder's pid and start time, and is removed at release; a second search finds it held
    and stops with one line saying who holds it."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode("utf-8", "replace").strip() or "pid not written yet"
            os.close(fd)
            raise PipelineError(f"{path}: another search is writing {out_dir} ({holder}); "
                                f"wait for it to end") from None
        try:  # the holder before us may have removed the file as we opened it: open anew
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # while held: an opener that waits re-checks the inode
        os.close(fd)
