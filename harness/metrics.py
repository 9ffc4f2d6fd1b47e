"""Disentanglement proxies: pure functions on arrays."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment


def contingency(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n_codes, n_labels) counts of each (code, label) pair."""
    codes, labels = np.asarray(codes, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    table = np.zeros((codes.max(initial=0) + 1, labels.max(initial=0) + 1), dtype=np.int64)
    np.add.at(table, (codes, labels), 1)
    return table


def hungarian_accuracy(codes: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy after the best one-to-one map from codes to labels (Hungarian matching)."""
    table = contingency(codes, labels)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(labels))


def majority_accuracy(codes: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Accuracy when each code maps to its most frequent label (many-to-one), and how many
    distinct labels that map reaches."""
    table = contingency(codes, labels)
    used = table.sum(axis=1) > 0
    reached = np.unique(table[used].argmax(axis=1))
    return float(table.max(axis=1).sum() / len(labels)), int(len(reached))


def categorical_entropy(n_categories: int) -> float:
    """H(c) of a uniform categorical code, in nats: ln K."""
    return math.log(n_categories)


def mutual_information_bound(cross_entropy: float, n_categories: int) -> float:
    """Variational lower bound L_I = H(c) - E[-log Q(c|x)], in nats."""
    return categorical_entropy(n_categories) - cross_entropy


def uniform_entropy(low: float = -1.0, high: float = 1.0) -> float:
    """Differential entropy of Unif(low, high), in nats."""
    return math.log(high - low)
