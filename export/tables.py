"""Result tables shared by the command lines: rows (instances of one dataclass) to CSV, and a markdown table printed
and optionally written next to the CSV."""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path


def write_csv(rows: list, path: str | os.PathLike, row_type: type) -> Path:
    """`rows` (instances of the dataclass `row_type`) as CSV with one column per field; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(row_type)])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    return path


def report(table: str, rows: list, row_type: type, *, csv_path=None, md_path=None, out=None) -> None:
    """Print the markdown `table`; write the rows to `csv_path` and the table to `md_path` where given."""
    out = out or sys.stdout
    print(table, end="", file=out)
    if csv_path:
        print(f"wrote {write_csv(rows, csv_path, row_type)}", file=out)
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(table)
        print(f"wrote {md_path}", file=out)
