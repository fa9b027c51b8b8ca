"""The saved abstention calibration: one JSON file beside the index, read by the pipeline, written by evaluation.

``calibration.json`` maps a pipeline's ``calibration_key()`` (retrieval settings and reader) to the rule chosen
on the golden train split, its train F1, each signal's ROC AUC and a stamp of the index version and questions it
was computed from. Choosing the rule is ``rag.evaluate.calibrate``; this module only stores it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

FILE = "calibration.json"
log = logging.getLogger(__name__)


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
    """Store ``entry`` under ``key``, keeping the other keys; written atomically (a crash keeps the old file)."""
    path = Path(index_dir) / FILE
    table = load(index_dir) | {key: entry}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)
