"""Disentanglement proxies and sample-quality metrics: pure functions on arrays."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.linalg import LinAlgWarning, sqrtm
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


# Sample quality, on the features and digits of the shipped classifier (harness/classifier.py)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D), N, M >= 2:
    |mu_a - mu_b|² + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^½), sample covariances (ddof 1), in float64.

    tr((C_a C_b)^½) is computed as tr((R C_b R)^½) with R = C_a^½ (the same eigenvalues), so sqrtm
    only ever sees symmetric positive semi-definite matrices, whose square roots always exist: the
    product of two singular covariances (dead ReLU units, fewer samples than dimensions, a collapsed
    generator whose images are all alike) can have none, and sqrtm then returns NaN. Their rounding-
    level negative eigenvalues give sqrtm tiny imaginary parts, which are dropped; their positive
    twins leave an absolute error of about 1e-7·tr(C) when covariances are rank-deficient. The
    result is clipped at 0, where identical sets land within rounding.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N, D) feature sets with N >= 2 and one D, got {a.shape} and {b.shape}")
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))  # (D, D); np.cov of one column is 0-d
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)  # "Matrix is singular": expected, see above
        root_a = sqrtm(cov_a).real
        trace_root = np.trace(sqrtm(root_a @ cov_b @ root_a)).real
    mean_gap = a.mean(axis=0) - b.mean(axis=0)
    return max(float(mean_gap @ mean_gap + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root), 0.0)


def generated_purity(categories: np.ndarray, predicted: np.ndarray) -> tuple[float, int]:
    """For one categorical code: `categories` (N,) the category each generated image was drawn with,
    `predicted` (N,) the classifier's digit for it, N >= 1.

    Purity: for each category that drew at least one image, the share of its images given its
    majority digit (the most frequent prediction; ties go to the smaller digit), averaged over those
    categories with equal weight. Covered: how many distinct digits are the majority digit of some
    category (1 when every category draws the same digit; at most min(K, 10)). A code that draws 4s
    and 9s from one category loses purity there, and coverage when no other category draws one of them.
    """
    table = contingency(categories, predicted)  # (categories, digits) counts
    drawn = table[table.sum(axis=1) > 0]
    purity = float(np.mean(drawn.max(axis=1) / drawn.sum(axis=1)))
    return purity, len(np.unique(drawn.argmax(axis=1)))
