"""The saved abstention calibration: one JSON file beside the index, read by the pipeline, written by evaluation.

``calibration.json`` maps a pipeline's ``calibration_key()`` (retrieval settings and reader) to the rule chosen
on the golden train split, its train F1, each signal's ROC AUC and a stamp of the index version and questions it
was computed from. Choosing the rule is ``rag.choose.calibrate``; this module only stores it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from rag.config import UserError

FILE = "calibration.json"
log = logging.getLogger(__name__)


class CalibrationWriteError(UserError, RuntimeError):
    """The calibration file cannot be written (full disk, no permission); the old one is kept."""


def load(index_dir: str | Path) -> dict:
    """Every saved calibration for this index, by key ({} when none was made, or the file is damaged)."""
    path = Path(index_dir) / FILE
    try:
        table = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError) as e:
        table = e
    if not isinstance(table, dict):  # the next evaluation calibrates again and rewrites it
        log.warning("ignoring %s: unreadable or damaged (%s)", path, type(table).__name__)
        return {}
    return table


def save(index_dir: str | Path, key: str, entry: dict) -> None:
    """Store ``entry`` under ``key``, keeping the other keys; written atomically (a crash or a failed write keeps
    the old file, and a failed write is one ``CalibrationWriteError`` line)."""
    path = Path(index_dir) / FILE
    table = load(index_dir) | {key: entry}
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(table, indent=1))
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut must not leave an empty file
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CalibrationWriteError(f"cannot save the calibration to {path} ({e.strerror or e}); the old file is "
                                    f"kept; free disk space or make {path.parent} writable") from None
