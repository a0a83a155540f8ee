"""Who each photo of a folder shows: a labels CSV, the sub-folder, or the file name."""
from __future__ import annotations

import csv
import re
from pathlib import Path

#: "alice_1", "alice-02", "alice 3", "alice (4)" -> "alice"
NUMBER_SUFFIX = re.compile(r"(?:[ _-]+\d+|\s*\(\d+\))$")


def person_from_path(path: Path, folder: Path, labels: dict | None = None) -> str:
    """Who a photo shows: its label if given, else its first sub-folder under ``folder``, else its
    file name without a trailing number."""
    rel = path.relative_to(folder)
    if labels:
        for key in (rel.as_posix(), path.name):
            if key in labels:
                return labels[key]
    if len(rel.parts) > 1:
        return rel.parts[0]
    return NUMBER_SUFFIX.sub("", path.stem) or path.stem


def read_labels(csv_path: Path) -> dict:
    """{image: identity} from a CSV with a header row (image, identity)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    return {r[0].strip(): r[1].strip() for r in rows[1:] if len(r) >= 2 and r[0].strip()}
