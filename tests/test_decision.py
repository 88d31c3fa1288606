"""The decision rule chosen on out-of-fold scores: threshold and uncertain band (training/metrics.py), by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import choose_decision, verdict_error_band


def test_the_verdict_error_band_is_the_narrowest_with_that_error_outside():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.5, 0.45, 0.6, 0.8, 0.9])
    # at 10 %: at and above 0.6 no real (0.5 would make it 1 of 4); at and below 0.3 no fake (0.45 would be 1 of 4)
    assert verdict_error_band(y, s, 0.10) == (0.3, 0.6)
    # at 25 %: 0.45 and up holds 1 real of 5 (20 %); 0.5 and down holds 1 fake of 5 (20 %; 0.6 would be 2 of 6)
    assert verdict_error_band(y, s, 0.25) == (0.5, 0.45)
    d = choose_decision(y, s, band_error=0.10, band="verdict_error")
    assert d["threshold"] == pytest.approx(0.6) and d["uncertain_band"] == [0.3, 0.6]
    assert d["band"]["inside"] == pytest.approx(0.25) and d["band"]["error_outside"] == 0.0
    assert d["band"]["inside_reals"] == pytest.approx(0.25) and d["band"]["inside_fakes"] == pytest.approx(0.25)
    assert "25% of images fall inside" in d["rule"]


def test_the_quantile_band_runs_between_the_classes_quantiles():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.5, 0.45, 0.6, 0.8, 0.9])
    q = choose_decision(y, s, band_error=0.10, band="quantile")
    lo, hi = q["uncertain_band"]
    assert lo == pytest.approx(np.quantile(s[4:], 0.1)) and hi == pytest.approx(max(np.quantile(s[:4], 0.9), 0.6))
    assert q["band"]["inside"] == pytest.approx(1 / 8) and "quantile" in q["rule"]


def test_an_overlapping_band_reports_the_error_it_leaves():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert verdict_error_band(y, s, 0.2) == (0.6, 0.4)  # each side holds its 20 % on its own; they overlap
    d = choose_decision(y, s, band_error=0.2)
    lo, hi = d["uncertain_band"]
    assert lo <= d["threshold"] <= hi
    assert d["band"]["error_outside"] == pytest.approx(1 / 8), "the 0.4 fake is called real, and said so"
