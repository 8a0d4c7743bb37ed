"""Metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from guardprob.evaluation.metrics import binary_metrics, expected_calibration_error, multilabel_metrics

Y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
S = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.8], [0.1, 0.3]])
IDS = ("S1", "S2")


def test_f1_and_hamming_by_hand():
    m = multilabel_metrics(Y, S, IDS)
    # predictions at 0.5: [[1,0],[1,1],[0,1],[0,0]] -> TP 3 (S1 row0, S2 rows 1,2), FP 1 (S1 row1), FN 1 (S1 row2)
    assert m.micro_f1 == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # S1: TP1 FP1 FN1 -> F1 0.5; S2: TP2 FP0 FN0 -> 1.0
    assert m.macro_f1 == pytest.approx(0.75)
    assert m.per_category["S1"]["f1"] == pytest.approx(0.5)
    assert m.hamming_loss == pytest.approx(2 / 8)


def test_auc_brier_by_hand():
    m = multilabel_metrics(Y, S, IDS)
    # S1: positives {0.9, 0.4}, negatives {0.6, 0.1}: pairs won 0.9>0.6, 0.9>0.1, 0.4>0.1 -> 3/4
    assert m.per_category["S1"]["roc_auc"] == pytest.approx(0.75)
    assert m.per_category["S2"]["roc_auc"] == pytest.approx(1.0)
    assert m.macro_roc_auc == pytest.approx(0.875)
    # micro: positives {.9,.4,.7,.8} vs negatives {.6,.1,.2,.3}: only 0.4 < 0.6 is lost -> 15/16
    assert m.micro_roc_auc == pytest.approx(15 / 16)
    # S1 ranking .9(+) .6(-) .4(+) .1(-): AP = 0.5 * 1 + 0.5 * 2/3
    assert m.per_category["S1"]["pr_auc"] == pytest.approx(0.5 + 1 / 3)
    brier = np.mean((S - Y) ** 2)
    assert m.brier == pytest.approx(brier)


def test_thresholds_per_column():
    m = multilabel_metrics(Y, S, IDS, thresholds=np.array([0.95, 0.5]))
    assert m.per_category["S1"]["f1"] == 0.0
    assert m.per_category["S2"]["f1"] == pytest.approx(1.0)


def test_ece_by_hand():
    # bins [0.1,0.2): p=.15 y=0 ; [0.8,0.9): p=.85,.85 y=1,0 -> |0-.15|*1/3 + |.5-.85|*2/3
    assert expected_calibration_error(np.array([0, 1, 0]), np.array([0.15, 0.85, 0.85])) == pytest.approx(0.15 / 3 + 0.35 * 2 / 3)


def test_category_without_positive_skips_auc_keeps_going():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.8, 0.1], [0.3, 0.2], [0.6, 0.4]])
    m = multilabel_metrics(y, s, IDS)
    assert m.skipped_auc == ("S2",)
    assert math.isnan(m.per_category["S2"]["roc_auc"])
    assert m.macro_roc_auc == pytest.approx(1.0)  # S1 alone


def test_binary_metrics():
    b = binary_metrics(np.array([1, 0, 1, 0]), np.array([0.9, 0.2, 0.4, 0.6]))
    assert b.roc_auc == pytest.approx(0.75)
    assert b.f1 == pytest.approx(0.5)  # TP1 FP1 FN1
    assert b.brier == pytest.approx((0.01 + 0.04 + 0.36 + 0.36) / 4)
    assert binary_metrics(np.array([1, 1]), np.array([0.3, 0.9])) is None
