"""Rows of different lengths held as one flat array and row offsets (the answers' tokens and n-gram codes, the prompt
tokens' incidence by row, the reversed neighbour lists): reading a few rows of a million is then a gather of their
positions, with no Python loop over rows and no pass over the whole array."""
from __future__ import annotations

from typing import Tuple

import numpy as np


def row_positions(start: np.ndarray, rows) -> Tuple[np.ndarray, np.ndarray]:
    """(each row's length, the flat positions of their items, rows in the order given) for rows of a ragged array
    whose row i spans start[i]:start[i + 1]."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = start[rows + 1] - start[rows]
    before = np.cumsum(lengths) - lengths
    return lengths, np.repeat(start[rows] - before, lengths) + np.arange(int(lengths.sum()))
