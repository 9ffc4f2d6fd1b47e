"""Metrics on inputs whose answers can be worked out by hand, and on the extremes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.metrics import (
    categorical_entropy,
    contingency,
    hungarian_accuracy,
    majority_accuracy,
    mutual_information_bound,
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
