"""Disentanglement proxies and sample-quality metrics: pure functions on arrays."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.linalg import LinAlgWarning, sqrtm
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr


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
    return float(table.max(axis=1).sum() / len(labels)), len(reached)


def categorical_entropy(n_categories: int) -> float:
    """H(c) of a uniform categorical code, in nats: ln K."""
    return math.log(n_categories)


def mutual_information_bound(cross_entropy: float, n_categories: int) -> float:
    """Variational lower bound L_I = H(c) - E[-log Q(c|x)], in nats."""
    return categorical_entropy(n_categories) - cross_entropy


def uniform_entropy(low: float = -1.0, high: float = 1.0) -> float:
    """Differential entropy of Unif(low, high), in nats."""
    return math.log(high - low)


# Continuous codes against measured image properties (harness.morphology): Spearman ρ of each
# code with each property, on generated sweeps and through Q on real digits.

MIN_PAIRS = 3  # below this many finite pairs a rank correlation carries no information


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ of two (N,) samples over the pairs where both are finite; 0 where it is
    undefined (fewer than MIN_PAIRS such pairs, or either side constant on them)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if len(x) < MIN_PAIRS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(spearmanr(x, y).statistic)


def spearman_matrix(codes: np.ndarray, properties: np.ndarray) -> np.ndarray:
    """(N, J) codes and (N, P) properties -> (J, P) Spearman ρ; each pair uses the rows where
    both are finite (a NaN property drops that row for that property only)."""
    codes, properties = np.asarray(codes), np.asarray(properties)
    n_codes, n_properties = codes.shape[1], properties.shape[1]
    rho = np.zeros((n_codes, n_properties))
    for j in range(n_codes):
        for p in range(n_properties):
            rho[j, p] = spearman_rho(codes[:, j], properties[:, p])
    return rho


def sweep_spearman(values: np.ndarray, properties: np.ndarray) -> np.ndarray:
    """ρ of one swept code with each property: (V,) code values and (R, V, P) properties, where
    properties[r, v] belongs to the image of noise row r (everything but the code held) at
    values[v] -> (P,) the mean over rows of the within-row Spearman ρ. Within a row only the
    code moves, so the digit-to-digit spread of a property does not dilute ρ. A row with fewer
    than MIN_PAIRS finite values of a property (blank images) is left out for that property;
    with no row left, ρ is 0."""
    values, properties = np.asarray(values, dtype=np.float64), np.asarray(properties, dtype=np.float64)
    if properties.ndim != 3 or properties.shape[1] != len(values):
        raise ValueError(f"expected properties of shape (R, {len(values)}, P), got {properties.shape}")
    rho = np.zeros(properties.shape[2])
    for p in range(properties.shape[2]):
        rows = [row for row in properties[:, :, p] if np.isfinite(row).sum() >= MIN_PAIRS]  # each (V,)
        if rows:
            rho[p] = np.mean([spearman_rho(values, row) for row in rows])
    return rho


def exclusivity_gap(rho: np.ndarray) -> float:
    """How exclusively codes map to properties, in [0, 1] (a MIG-style gap): (J, P) ρ of codes
    with properties -> per property, the largest |ρ| over codes minus the second largest,
    averaged over properties. A code with |ρ| = 0 everywhere stands in as the runner-up, so
    with a single code a property's gap is its |ρ| (1 when the code drives it perfectly, 0
    when not at all). One code may drive several properties (as in MIG, which scores factors)."""
    magnitude = np.abs(np.asarray(rho, dtype=np.float64))  # (J, P)
    if magnitude.ndim != 2 or magnitude.shape[0] == 0:
        raise ValueError(f"expected a (J, P) matrix with J >= 1, got shape {magnitude.shape}")
    ranked = np.sort(np.vstack([magnitude, np.zeros(magnitude.shape[1])]), axis=0)  # (J + 1, P), ascending
    return float(np.mean(ranked[-1] - ranked[-2]))


def continuous_code_metrics(con_rho: np.ndarray, q_rho: np.ndarray, properties: Sequence[str]) -> dict[str, float]:
    """The continuous codes' metrics from two (J, P) ρ matrices, columns named `properties`:
    con_rho, each code swept in generated images; q_rho, Q's mean for each code on real digits.
    Keys: eval/con_rho/c{j}/{property} and eval/q_rho/c{j}/{property} (signed ρ),
    eval/con_rho/c{j} and eval/q_rho/c{j} (the largest |ρ| of code j), and eval/con_gap
    (exclusivity_gap of con_rho): 2·J·(P + 1) + 1 keys."""
    con_rho, q_rho = np.asarray(con_rho, dtype=np.float64), np.asarray(q_rho, dtype=np.float64)
    if con_rho.ndim != 2 or con_rho.shape[1] != len(properties) or q_rho.shape != con_rho.shape:
        raise ValueError(f"expected two (J, {len(properties)}) matrices, got {con_rho.shape} and {q_rho.shape}")
    values: dict[str, float] = {}
    for prefix, rho in (("eval/con_rho", con_rho), ("eval/q_rho", q_rho)):
        for j, code_rho in enumerate(rho):  # (P,)
            values.update({f"{prefix}/c{j}/{name}": float(r) for name, r in zip(properties, code_rho, strict=True)})
            values[f"{prefix}/c{j}"] = float(np.abs(code_rho).max())
    values["eval/con_gap"] = exclusivity_gap(con_rho)
    return values


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
