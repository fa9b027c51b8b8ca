"""Atomic replacement of a file or a folder, and the locks that keep an index folder consistent under several processes.

``write_text`` is for one-file results and caches (scores, probe accuracies, mined runs), ``replace_dir`` for
artefacts that are one folder (trained models, datasets, exported embedders): a crash while
writing leaves the previous version usable. The index publishes versions by swapping a ``CURRENT`` pointer
(``rag/index.py``) and guards it with two ``flock`` locks on files inside its folder: ``writer_lock`` lets one
writer at a time build and clean up (a second waits, then gives up with one line), ``readers_lock`` lets a writer
delete an old version only when no reader is loading one. flock locks die with their process, so a killed run
never leaves a stale lock behind. Left out on purpose: Windows (no fcntl: no locks, as before) and network file
systems whose flock is advisory only between processes on one machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from rag.config import UserError

try:
    import fcntl
except ImportError:  # Windows: run without locks rather than not at all
    fcntl = None

log = logging.getLogger(__name__)
WRITER, READERS = ".lock-writer", ".lock-readers"  # dot names: a version sweep never takes them for debris


class LockTimeout(UserError, RuntimeError):
    """Another writer held the folder's lock for longer than we were willing to wait."""


def write_text(path: Path, text: str) -> None:
    """``path`` holding ``text``, written whole or not at all: a run killed mid-write leaves the old file (or none),
    never half a file that a later run would read as results."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a fully written folder ``tmp`` to ``dest``, keeping the old ``dest`` until the new one is in place."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _open(path: Path) -> int | None:
    """A descriptor to lock ``path`` with, or None where it cannot be had (no fcntl, a read-only folder): a folder
    nobody can write to has no writer to race with."""
    if fcntl is None:
        return None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        with contextlib.suppress(OSError):
            return os.open(path, flags, 0o644)
    return None


@contextlib.contextmanager
def writer_lock(folder: Path, timeout: float) -> Iterator[None]:
    """Hold ``folder``'s writer lock; wait up to ``timeout`` seconds for another writer (saying so once), then
    raise ``LockTimeout``."""
    fd = _open(Path(folder) / WRITER)
    try:
        if fd is not None:
            deadline = time.monotonic() + timeout
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("waiting for another openbook writer on %s (up to %.0f s)", folder, timeout)
                while True:  # flock has no timeout of its own: poll
                    time.sleep(0.2)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise LockTimeout(f"another openbook writer has held {folder} for over {timeout:.0f} s; "
                                              "wait for it to finish, or pass another --index-dir") from None
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def readers_lock(folder: Path, exclusive: bool = False) -> Iterator[bool]:
    """Shared: held by a reader while it loads (it waits only while a writer deletes). Exclusive: tried once by a
    writer before deleting old versions; yields whether it is held (no: a reader is loading, leave them)."""
    fd = _open(Path(folder) / READERS)
    try:
        held = fd is None  # no locks to be had: behave as before there were any
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
                held = True
            except BlockingIOError:
                held = False
        yield held
    finally:
        if fd is not None:
            os.close(fd)
