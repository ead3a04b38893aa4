"""Exact-world presets (recipes for :func:`trajlab.models.exact.make_world`); no torch import."""

import math

EXACT_WORLDS: dict[str, dict] = {
    # single Gaussian, log-spaced spectrum 4 .. 0.01, random (seeded) eigenbasis
    "gauss-8d": {"kind": "gaussian", "d": 8, "lam_max": 4.0, "lam_min": 0.01, "basis_seed": 0},
    # two classes +-m (|m| = 4 along (1,...,1)/sqrt d), isotropic component variance s^2 = 1/2:
    # speciation at ab = 1/Lambda, Lambda = |m|^2 + s^2 = 16.5; s^2 = 1/2 makes the clone
    # probability at t_S exactly the high-d value phi(t_S) = 0.7752 (THEORY.md; see theory.py)
    "gmm-2class": {"kind": "two-class", "d": 16, "m_norm": 4.0, "s": math.sqrt(0.5)},
    # 10 equal-weight modes on a sphere of radius 4, isotropic variance 0.25 (mode coverage)
    "gmm-10mode": {"kind": "modes", "d": 16, "n_modes": 10, "radius": 4.0, "s": 0.5, "seed": 0},
}
