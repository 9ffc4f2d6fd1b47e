"""Metrics on inputs whose answers can be worked out by hand, and on the extremes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.metrics import (
    categorical_entropy,
    contingency,
    continuous_code_metrics,
    exclusivity_gap,
    frechet_distance,
    generated_purity,
    hungarian_accuracy,
    majority_accuracy,
    mutual_information_bound,
    spearman_matrix,
    spearman_rho,
    sweep_spearman,
    uniform_entropy,
)

LABELS = np.repeat(np.arange(10), 20)  # 200 labels, 20 of each digit


def test_contingency_counts_pairs() -> None:
    table = contingency(np.array([0, 0, 1, 2]), np.array([1, 1, 0, 1]))
    assert table.tolist() == [[0, 2], [1, 0], [0, 1]]


def test_a_permuted_perfect_code_scores_one() -> None:
    codes = (LABELS * 3 + 7) % 10  # a bijection of the labels
    assert hungarian_accuracy(codes, LABELS) == 1.0
    assert majority_accuracy(codes, LABELS) == (1.0, 10)


def test_a_constant_code_scores_chance() -> None:
    codes = np.zeros_like(LABELS)
    assert hungarian_accuracy(codes, LABELS) == pytest.approx(0.1)
    assert majority_accuracy(codes, LABELS) == (pytest.approx(0.1), 1)


def test_hand_worked_example_one_to_one_vs_many_to_one() -> None:
    # code 0 holds labels {0, 0}; code 1 holds labels {0, 1, 1, 2}
    labels = np.array([0, 0, 0, 1, 1, 2])
    codes = np.array([0, 0, 1, 1, 1, 1])
    # one-to-one: 0->0 (2 right), 1->1 (2 right) = 4/6
    assert hungarian_accuracy(codes, labels) == pytest.approx(4 / 6)
    # many-to-one: code 0 -> 0 (2), code 1 -> 1 (2): also 4/6, reaching 2 labels
    assert majority_accuracy(codes, labels) == (pytest.approx(4 / 6), 2)


def test_majority_beats_hungarian_when_two_codes_share_a_digit() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    codes = np.array([0, 0, 1, 1, 2, 2])  # digit 0 split over codes 0 and 1
    assert majority_accuracy(codes, labels) == (1.0, 2)
    assert hungarian_accuracy(codes, labels) == pytest.approx(4 / 6)  # only one code may claim digit 0


def test_more_codes_than_labels_is_fine() -> None:
    labels = np.array([0, 1, 0, 1])
    codes = np.array([5, 7, 5, 7])
    assert hungarian_accuracy(codes, labels) == 1.0


def test_entropies_and_bound() -> None:
    assert categorical_entropy(10) == pytest.approx(math.log(10))
    assert categorical_entropy(10) == pytest.approx(2.302585, abs=1e-6)
    assert mutual_information_bound(0.0, 10) == pytest.approx(math.log(10))  # perfect Q: the bound meets H(c)
    assert mutual_information_bound(math.log(10), 10) == pytest.approx(0.0)  # uniform Q: no information
    assert uniform_entropy() == pytest.approx(math.log(2))


# Continuous codes against image properties: Spearman ρ, the sweep, the exclusivity gap.

T = np.linspace(-2.0, 2.0, 9)  # (9,) a code's values


def test_rho_of_monotone_antitone_and_constant_inputs() -> None:
    assert spearman_rho(T, np.exp(T)) == pytest.approx(1.0)  # any increasing map, not only linear
    assert spearman_rho(T, -(T**3)) == pytest.approx(-1.0)
    assert spearman_rho(T, np.full_like(T, 2.5)) == 0.0  # constant: 0, not NaN
    assert spearman_rho(np.zeros_like(T), T) == 0.0


def test_rho_hand_worked() -> None:
    # ranks (1, 3, 2, 4) against (1, 2, 3, 4): sum d² = 2, ρ = 1 - 6·2 / (4·15) = 0.8
    assert spearman_rho(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 30.0, 20.0, 40.0])) == pytest.approx(0.8)


def test_rho_drops_nan_pairs_and_is_zero_without_enough_of_them() -> None:
    y = np.exp(T)
    y[[1, 4]] = np.nan
    assert spearman_rho(T, y) == pytest.approx(1.0)
    assert spearman_rho(T[:3], np.array([1.0, np.nan, 3.0])) == 0.0  # two pairs left
    assert spearman_rho(T, np.full_like(T, np.nan)) == 0.0


def test_rho_matrix_pairs_every_code_with_every_property() -> None:
    codes = np.stack([T, -T], axis=1)  # (9, 2)
    thickness = -T.copy()
    thickness[[0, 8]] = np.nan  # blank images: dropped for this property only
    properties = np.stack([T**3, np.full_like(T, 1.0), thickness], axis=1)  # (9, 3)
    rho = spearman_matrix(codes, properties)
    assert rho.shape == (2, 3)
    assert rho == pytest.approx(np.array([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]]))
    assert spearman_matrix(codes[:, :0], properties).shape == (0, 3)


def test_sweep_rho_is_within_rows_so_digit_offsets_do_not_dilute_it() -> None:
    values = np.linspace(-2.0, 2.0, 5)  # (V,)
    offsets = np.array([100.0, 0.0, 50.0])[:, None]  # three digits of very different widths
    width = offsets + 0.1 * values  # (R, V): the code widens every digit a little
    slant = offsets - values
    constant = np.zeros_like(width)
    properties = np.stack([slant, constant, width], axis=2)  # (3, 5, 3)
    assert sweep_spearman(values, properties) == pytest.approx([-1.0, 0.0, 1.0])
    pooled = spearman_matrix(np.tile(values, 3)[:, None], properties.reshape(15, 3))
    assert abs(pooled[0, 2]) < 0.5  # the same images, pooled: the digit-to-digit spread dominates


def test_sweep_rho_hand_worked_mean_over_rows_and_blank_rows_left_out() -> None:
    values = np.arange(5.0)
    rows = np.array(
        [
            [1.0, 2.0, 3.0, 4.0, 5.0],  # ρ = 1
            [1.0, 3.0, 2.0, 4.0, 5.0],  # one swap: ρ = 1 - 6·2 / (5·24) = 0.9
            [np.nan] * 5,  # a blank row: left out, not counted as 0
            [np.nan, np.nan, np.nan, 1.0, 2.0],  # two finite values: left out
        ]
    )
    assert sweep_spearman(values, rows[:, :, None]) == pytest.approx([0.95])
    assert sweep_spearman(values, rows[2:, :, None]) == pytest.approx([0.0])  # nothing left: 0


def test_sweep_rho_refuses_a_grid_that_does_not_match_the_values() -> None:
    with pytest.raises(ValueError, match=r"\(R, 5, P\)"):
        sweep_spearman(np.arange(5.0), np.zeros((3, 4, 3)))


def test_gap_extremes() -> None:
    assert exclusivity_gap(np.eye(3)) == pytest.approx(1.0)  # one code per property
    assert exclusivity_gap(-np.eye(3)[[2, 0, 1]]) == pytest.approx(1.0)  # signs and order do not matter
    assert exclusivity_gap(np.full((3, 3), 0.8)) == pytest.approx(0.0)  # every code drives everything
    assert exclusivity_gap(np.zeros((2, 3))) == pytest.approx(0.0)  # nothing driven


def test_gap_with_a_single_code_is_its_rho() -> None:
    assert exclusivity_gap(np.ones((1, 3))) == pytest.approx(1.0)
    assert exclusivity_gap(np.zeros((1, 3))) == pytest.approx(0.0)
    assert exclusivity_gap(np.array([[0.9, -0.3, 0.0]])) == pytest.approx(0.4)  # (0.9 + 0.3 + 0) / 3


def test_gap_hand_worked() -> None:
    rho = np.array([[0.9, 0.2, 0.5], [-0.3, 0.6, 0.5]])
    # slant 0.9 - 0.3 = 0.6, thickness 0.6 - 0.2 = 0.4, width 0.5 - 0.5 = 0: mean 1/3
    assert exclusivity_gap(rho) == pytest.approx(1 / 3)


def test_continuous_code_metrics_names_and_values() -> None:
    names = ("slant", "thickness", "width")
    con_rho = np.array([[-0.9, 0.2, 0.1], [0.3, 0.6, 0.7]])
    q_rho = np.array([[0.5, 0.0, -0.8], [0.1, 0.2, 0.3]])
    values = continuous_code_metrics(con_rho, q_rho, names)
    assert len(values) == 4 * 2 * 2 + 1
    assert values["eval/con_rho/c0/slant"] == pytest.approx(-0.9)  # signed
    assert values["eval/con_rho/c1/width"] == pytest.approx(0.7)
    assert values["eval/q_rho/c0/width"] == pytest.approx(-0.8)
    assert values["eval/con_rho/c0"] == pytest.approx(0.9)  # the largest |ρ|
    assert values["eval/con_rho/c1"] == pytest.approx(0.7)
    assert values["eval/q_rho/c0"] == pytest.approx(0.8)
    assert values["eval/q_rho/c1"] == pytest.approx(0.3)
    assert values["eval/con_gap"] == pytest.approx(((0.9 - 0.3) + (0.6 - 0.2) + (0.7 - 0.1)) / 3)
    assert sorted(values) == sorted(
        [
            *("eval/con_rho/c0", "eval/con_rho/c0/slant", "eval/con_rho/c0/thickness", "eval/con_rho/c0/width"),
            *("eval/con_rho/c1", "eval/con_rho/c1/slant", "eval/con_rho/c1/thickness", "eval/con_rho/c1/width"),
            *("eval/q_rho/c0", "eval/q_rho/c0/slant", "eval/q_rho/c0/thickness", "eval/q_rho/c0/width"),
            *("eval/q_rho/c1", "eval/q_rho/c1/slant", "eval/q_rho/c1/thickness", "eval/q_rho/c1/width"),
            "eval/con_gap",
        ]
    )


def test_continuous_code_metrics_refuses_mismatched_matrices() -> None:
    names = ("slant", "thickness", "width")
    with pytest.raises(ValueError, match="expected two"):
        continuous_code_metrics(np.zeros((2, 3)), np.zeros((1, 3)), names)
    with pytest.raises(ValueError, match="expected two"):
        continuous_code_metrics(np.zeros((2, 2)), np.zeros((2, 2)), names)


# Sample quality: Fréchet distance and the purity of generated categories


def standardised(n: int, seed: int) -> np.ndarray:
    """(n, 1) samples with mean 0 and sample std (ddof 1) 1, up to rounding."""
    x = np.random.default_rng(seed).normal(size=(n, 1))
    return (x - x.mean()) / x.std(ddof=1)


def correlated(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d))  # (n, d), a full covariance


def test_frechet_distance_of_1d_gaussians_is_the_mean_and_std_gaps_squared() -> None:
    a = 1.5 + 2.0 * standardised(500, seed=0)  # mu 1.5, sigma 2
    b = -0.5 + 0.5 * standardised(300, seed=1)  # mu -0.5, sigma 0.5
    assert frechet_distance(a, b) == pytest.approx((1.5 + 0.5) ** 2 + (2.0 - 0.5) ** 2)  # 6.25


def test_identical_sets_are_at_distance_zero() -> None:
    x = correlated(400, 16, seed=0)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_a_shifted_set_is_at_the_shift_squared() -> None:
    x = correlated(400, 16, seed=0)
    shift = np.linspace(-1.0, 2.0, 16)
    assert frechet_distance(x, x + shift) == pytest.approx(shift @ shift)  # same covariance: only the means differ


def test_dead_units_change_nothing() -> None:
    # features that are 0 in both sets (dead ReLU units) make both covariances singular
    a, b = np.maximum(correlated(300, 12, seed=0), 0), np.maximum(correlated(200, 12, seed=1) + 0.5, 0)
    with_dead = np.zeros((300, 20)), np.zeros((200, 20))
    with_dead[0][:, 8:], with_dead[1][:, 8:] = a, b
    assert frechet_distance(*with_dead) == pytest.approx(frechet_distance(a, b), rel=1e-9)


def test_fewer_samples_than_dimensions_still_gives_the_shift_squared() -> None:
    x = correlated(10, 84, seed=0)  # covariance of rank 9 in 84 dimensions
    shift = np.full(84, 0.25)
    # the square roots of the 75 rounding-level eigenvalues add up: the error scales with tr(C), ~7,000 here
    total_variance = np.sum(x.var(axis=0, ddof=1))
    assert frechet_distance(x, x + shift) == pytest.approx(shift @ shift, abs=1e-6 * total_variance)


def test_a_collapsed_set_is_at_the_mean_gap_plus_the_other_sets_variance() -> None:
    # every generated image alike: its covariance is 0 up to rounding, and sqrtm of C_a C_b has no answer
    a = np.maximum(correlated(500, 84, seed=0), 0)
    one = np.maximum(np.random.default_rng(1).normal(size=84), 0)
    collapsed = np.repeat(one[None], 300, axis=0)
    expected = np.sum((a.mean(axis=0) - one) ** 2) + np.sum(a.var(axis=0, ddof=1))
    assert frechet_distance(a, collapsed) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(collapsed, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_refuses_mismatched_or_too_small_sets() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))


CATEGORIES = np.repeat(np.arange(10), 20)  # 10 categories, 20 generated images each


def test_purity_of_a_code_whose_every_category_draws_its_own_digit() -> None:
    predicted = (CATEGORIES * 3 + 7) % 10  # a bijection of the categories onto the digits
    assert generated_purity(CATEGORIES, predicted) == (1.0, 10)


def test_every_category_drawing_the_same_digit_covers_one() -> None:
    # pure categories, yet a collapsed code: coverage is what tells
    assert generated_purity(CATEGORIES, np.full_like(CATEGORIES, 4)) == (1.0, 1)


def test_purity_by_hand_with_a_tie_and_unequal_categories() -> None:
    categories = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([4, 4, 4, 9, 9, 4, 7, 7, 7])
    # category 0: 3 of 4 are 4s; category 1: one 9, one 4, the tie goes to 4; category 2: all 7s
    purity, covered = generated_purity(categories, predicted)
    assert purity == pytest.approx((3 / 4 + 1 / 2 + 3 / 3) / 3)  # each category weighs the same
    assert covered == 2  # majority digits {4, 7}: the 9s have no category of their own


def test_categories_that_drew_no_image_are_left_out() -> None:
    # categories 1 and 2 drew nothing: they neither dilute purity nor count as covering a digit
    assert generated_purity(np.array([0, 0, 3, 3, 3]), np.array([1, 1, 2, 2, 5])) == (
        pytest.approx((2 / 2 + 2 / 3) / 2),
        2,
    )
