"""Atomic replacement of a folder: a crash while writing leaves the previous version usable.

Used for artefacts that are one folder (trained models, datasets, exported embedders). The index itself
publishes versions by swapping a ``CURRENT`` pointer (``rag/index.py``), which also keeps readers consistent.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a fully written folder ``tmp`` to ``dest``, keeping the old ``dest`` until the new one is in place."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
