"""Parity figures come from polygraphy's comparator: the worst error relative to the reference's scale."""

import numpy as np

from dream_export.export.compare import scaled_error


def test_scaled_error_is_the_worst_error_over_the_reference_scale():
    ref = np.array([[2.0, -4.0], [1.0, 0.5]])
    got = ref + np.array([[0.0, 0.02], [-0.01, 0.0]])
    r = scaled_error(got.astype(np.float32), ref, tol=1e-2)
    assert r["scale"] == 4.0 and abs(r["max_abs"] - 0.02) < 1e-6 and abs(r["rel"] - 0.005) < 1e-6 and r["ok"]
    assert not scaled_error(got, ref, tol=1e-3)["ok"]  # 0.005 of scale > 1e-3


def test_non_finite_output_never_passes():
    ref = np.ones(4)
    got = np.array([1.0, np.nan, 1.0, 1.0])
    r = scaled_error(got, ref, tol=1.0)
    assert not r["ok"] and r["rel"] == float("inf")
    assert not scaled_error(np.array([1.0, np.inf, 1, 1]), ref, tol=1.0)["ok"]
