"""Atomic file and directory writes: a file is either complete or absent.

Writers produce a temporary sibling and ``os.replace`` it onto the target, so an interrupted
process never leaves a half-written checkpoint, map, manifest or zip for DVC to cache. A kill
-9 can still leave the hidden temporary (``.<name>.<random>.tmp``, a file or a folder) behind:
:func:`remove_stale_tmp` clears them when a stage next writes there. Around the writers,
:func:`refuse_overwrite` keeps a stage from writing over one of its own inputs and
:func:`output_errors` turns a full disk or a read-only folder into one ``error:`` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.core.errors import PipelineError

_OLD_DIR = re.compile(r"\..+\.old\.\d+")  # atomic_dir's previous folder, mid-swap


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success move it onto ``target``.

    The caller writes the temporary path with any library (``torch.save``, ``Image.save`` ...).
    On an exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would not
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """The text :func:`write_json` writes (for a caller that manages its own temporary file)."""
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json_text(obj))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``target`` as a whole.

    Used when a stage writes many files (a generated dataset): either the complete new folder
    is in place or the old one (or nothing) is.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old.{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Remove what killed atomic writes left in ``folder``: hidden ``.*.tmp`` files
    (:func:`atomic_path`) and folders (:func:`atomic_dir`), and ``.<name>.old.<pid>`` folders of
    an :func:`atomic_dir` swap cut short. Returns what was removed.

    Call it when a stage starts writing into a folder it owns, never while another process
    may be writing there (its temporary would go). Only ``folder`` itself unless
    ``recursive`` (for a folder whose whole tree is the stage's, as inference's map folder and
    training's run folder): a broad ``--out`` then cannot reach other stages' work.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for root, dirs, files in os.walk(folder):
        root = Path(root)
        for name in sorted(dirs):
            path = root / name
            if name.startswith(".") and (name.endswith(".tmp") or _OLD_DIR.fullmatch(name)):
                if path.is_symlink():
                    path.unlink()
                else:
                    shutil.rmtree(path)
                removed.append(path)
        dirs[:] = [d for d in dirs if recursive and root / d not in removed]
        for name in sorted(files):
            if name.startswith(".") and name.endswith(".tmp"):
                (root / name).unlink(missing_ok=True)
                removed.append(root / name)
    return removed


def refuse_overwrite(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], *,
                     key: str = "--out", folder: bool = False) -> None:
    """Raise a PipelineError when writing ``out`` would overwrite one of the stage's ``inputs``.

    ``inputs``: {what it is ("the prediction zip"): path} (None values are skipped). Paths are
    compared resolved, symlinks followed, both as written (the link that ``os.replace`` swaps)
    and as read (its target), plus ``os.path.samefile`` for hard links. ``folder``: ``out``
    is a folder replaced as a whole, so an input anywhere inside it counts too. The message
    names ``key`` (the option or params key that chose ``out``), ``out`` and the input.
    """
    out = Path(out)
    written = {out.parent.resolve() / out.name, out.resolve()}
    for what, inp in inputs.items():
        if inp is None:
            continue
        inp = Path(inp)
        read = {Path(os.path.abspath(inp)), inp.resolve()}
        clash = any(r == w or (folder and w in r.parents) for r in read for w in written)
        if not clash and out.exists() and inp.exists():
            with contextlib.suppress(OSError):
                clash = os.path.samefile(out, inp)
        if clash:
            raise PipelineError(f"{key}: {out} would overwrite {what} {inp}, an input of this "
                                f"stage; choose another output path")


@contextlib.contextmanager
def output_errors(where: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn an OSError raised inside (a full disk, a read-only folder) into a one-line
    PipelineError naming ``where``. Wrap only the writing: an error reading an input is not
    a "cannot write". The atomic writers have already removed their temporaries by then.
    """
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise PipelineError(f"{where}: cannot write{' ' + what if what else ''} ({reason})") from None
