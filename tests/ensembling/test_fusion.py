"""The fusion arithmetic: group means and the fused map."""

from __future__ import annotations

import numpy as np

from pipeline.ensembling import fusion


def test_group_mean_and_fuse():
    a, b = np.full((2, 1, 1), 0.2, np.float32), np.full((2, 1, 1), 0.6, np.float32)
    assert fusion.group_mean([]) is None
    np.testing.assert_allclose(fusion.group_mean([a, b]), 0.4)
    assert fusion.group_mean([a]) is not a  # a copy, never the member's own array
    np.testing.assert_allclose(fusion.fuse(a, None, b, alpha=5.0, beta=0.5), 0.5)
    np.testing.assert_allclose(fusion.fuse(a, b, None, alpha=0.5, beta=5.0), 0.5)
