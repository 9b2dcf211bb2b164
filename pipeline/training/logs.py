"""A run's CSV logs (``log.csv`` per logged step, ``val.csv`` per validation): append, and cut
back to a resumed iteration so that the re-run steps are not logged twice."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.core import atomic


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` to the CSV at ``path``, with a header of its keys when the file is new."""
    new = not path.is_file()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_log(path: Path, *, upto: int) -> None:
    """Keep rows with iteration <= ``upto`` (a resumed run re-logs what came after)."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if len(r) == len(header) and r[0].isdigit() and int(r[0]) <= upto]
    with atomic.atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *kept])
