"""The duplicates report kept inside the index directory it was made from.

``imgindex duplicates --save`` writes it; the service's
``GET /api/indexes/<name>/duplicates`` reads it. A build writes a new version
of the directory without it, so a report never outlives the index it
describes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imgindex.pipeline.atomic import atomic_file
from imgindex.pipeline.errors import IndexDirError
from imgindex.pipeline.lock import lock_index
from imgindex.pipeline.store import DUPLICATES_FILE, read_meta


def save_report(
    index_dir: str | os.PathLike, report: dict[str, Any], made_from: str
) -> Path:
    """Write ``report`` (``DuplicateReport.to_json()``) into ``index_dir``.

    ``made_from`` is the index's ``meta.updated`` read before the report was
    made. It is written under the index's lock, so a build cannot swap
    versions meanwhile, and refused if the index changed since.

    Raises
    ------
    IndexLocked
        If a build is writing the index now.
    IndexDirError
        If the index was rebuilt while the report was made, or cannot be written.
    """
    dest = Path(index_dir).resolve()
    with lock_index(dest):
        if read_meta(dest).updated != made_from:
            raise IndexDirError(
                f"index {str(dest)!r} was rebuilt while duplicates ran; run "
                "`imgindex duplicates --save` again"
            )
        path = dest / DUPLICATES_FILE
        try:
            with atomic_file(path, "w") as f:
                json.dump(report | {"index_updated": made_from}, f)
        except OSError as e:
            raise IndexDirError(
                f"cannot save the report in {str(dest)!r}: {e.strerror or e}"
            ) from None
    return path


def load_report(index_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved report of ``index_dir``, or None if there is none.

    Raises
    ------
    IndexDirError
        If the file is there but is not a report.
    """
    path = Path(index_dir) / DUPLICATES_FILE
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise IndexDirError(f"{str(path)!r} is not a duplicates report: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("duplicate_groups"), list):
        raise IndexDirError(f"{str(path)!r} is not a duplicates report")
    return data
