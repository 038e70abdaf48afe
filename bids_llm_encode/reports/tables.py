"""The networks TSVs: reading them, atom numbers and significant labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import AppError

Q_ALPHA = 0.05  # a label is significant when q < Q_ALPHA (q = max(p_time, p_space), FWER)
DIRECTIONS = ("activated", "deactivated")


def read_networks(path: Path, required) -> pd.DataFrame:
    """A networks TSV with numeric ``q``, 1-based ``atom_number`` and an ``atlas`` column;
    an unreadable file or a missing required column raises AppError."""
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise AppError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise AppError(f"{path} lacks the column(s) {', '.join(missing)}")
    table = table.copy()
    table["q"] = pd.to_numeric(table["q"], errors="coerce")
    table["atom_number"] = atom_numbers(table["atom"], path)
    if "atlas" not in table.columns:
        table["atlas"] = ""
    return table


def atom_numbers(column: pd.Series, path) -> np.ndarray:
    """1-based atom numbers from ``atom`` (``3`` or ``atom03``); a 0-based column (one that
    contains 0, as ``networks.label_atoms`` writes it) is shifted by one."""
    digits = column.astype(str).str.extract(r"(\d+)\s*$")[0]
    if digits.isna().any():
        raise AppError(f"{path}: column 'atom' must hold atom numbers")
    numbers = digits.astype(int).to_numpy()
    if numbers.size and numbers.min() == 0:
        numbers = numbers + 1
    return numbers


def labelled_atoms(table: pd.DataFrame) -> list[int]:
    """Atoms with a label q < Q_ALPHA, most significant first."""
    sig = table[table["q"] < Q_ALPHA]
    best = sig.groupby("atom_number")["q"].min().sort_values(kind="stable")
    return [int(a) for a in best.index]


def row_value(rows: pd.DataFrame, column: str, default) -> float:
    """The first numeric value of ``column`` in rows, else default (else 1.96)."""
    if column in rows.columns:
        vals = pd.to_numeric(rows[column], errors="coerce").dropna()
        if len(vals):
            return float(vals.iloc[0])
    return float(default if default is not None else 1.96)
