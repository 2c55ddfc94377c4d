"""Numpy helpers shared by the rule tests' independent references."""
from __future__ import annotations

import numpy as np


def sdiv(n, d):
    """n / d element-wise, 0 where d = 0 (the rules' safe division)."""
    n, d = np.broadcast_arrays(np.asarray(n, float), np.asarray(d, float))
    out = np.zeros_like(n)
    nz = d != 0
    out[nz] = n[nz] / d[nz]
    return out
