"""How sparse a model's weights are: per parameter zeros, sparsity and whether every N:M group holds.

    rows = sparsity_report(model.variables["params"])         # every conv / Dense kernel
    print(format_sparsity_report(rows))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compress.sparsity_masks import n_m_group_nonzeros, parse_n_m
from compress.sparsity_rules import as_rules, select
from zoo.tree import flatten


@dataclass(frozen=True)
class SparsityRow:
    path: str
    shape: tuple[int, ...]
    zeros: int
    total: int
    axis: int  # the N:M group axis checked
    n_m_ok: bool | None  # every group of M along `axis` has <= N non-zeros; None when M does not divide the axis

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def sparsity_report(params, rules=None, *, n_m="2:4") -> list[SparsityRow]:
    """One row per selected parameter: every kernel by default (depthwise ones grouped along their channels), or
    those `rules` select (regex strings or `Rule`s, with their axes)."""
    n, m = parse_n_m(n_m)
    flat = flatten(params)
    chosen, _ = select(flat, as_rules(rules), min_size=0, include_depthwise=True)
    rows = []
    for s in chosen:
        a = np.asarray(flat[s.path])
        ok = bool((n_m_group_nonzeros(a, m, s.axis) <= n).all()) if a.ndim and a.shape[s.axis] % m == 0 else None
        rows.append(SparsityRow(s.path, tuple(a.shape), int(a.size - np.count_nonzero(a)), int(a.size), s.axis, ok))
    return rows


def format_sparsity_report(rows: list[SparsityRow]) -> str:
    """A markdown table of `rows` with a total line (weights of all rows together); "N:M ok" is the pattern the
    report was made for."""
    yes_no = {True: "yes", False: "no", None: "-"}
    lines = [f"| parameter | shape | zeros | total | sparsity | N:M ok |", "|---|---|---:|---:|---:|:-:|"]
    for r in rows:
        lines.append(f"| {r.path} | {'x'.join(map(str, r.shape))} | {r.zeros:,} | {r.total:,} | {r.sparsity:.1%} | "
                     f"{yes_no[r.n_m_ok]} |")
    zeros, total = sum(r.zeros for r in rows), sum(r.total for r in rows)
    ok = sum(r.n_m_ok is True for r in rows)
    lines.append(f"| **all {len(rows)}** | | {zeros:,} | {total:,} | {zeros / max(total, 1):.1%} | "
                 f"{ok}/{sum(r.n_m_ok is not None for r in rows)} |")
    return "\n".join(lines)


def total_sparsity(rows: list[SparsityRow]) -> float:
    total = sum(r.total for r in rows)
    return sum(r.zeros for r in rows) / total if total else 0.0


__all__ = ["SparsityRow", "format_sparsity_report", "sparsity_report", "total_sparsity"]
