"""Exact-world presets (recipes for :func:`trajlab.models.exact.make_world`); no torch import."""

import math

EXACT_WORLDS: dict[str, dict] = {
    # single Gaussian, log-spaced spectrum 4 .. 0.01, random (seeded) eigenbasis
    "gauss-8d": {"kind": "gaussian", "d": 8, "lam_max": 4.0, "lam_min": 0.01, "basis_seed": 0},
    # two classes +-m (|m| = 4 along (1,...,1)/sqrt d), isotropic component variance s^2 = 1/2:
    # speciation at ab = 1/Lambda, Lambda = |m|^2 + s^2 = 16.5; s^2 = 1/2 makes the clone
    # probability at t_S exactly the high-d value phi(t_S) = 0.7752 (docs/theory.md §10.3; see theory.py)
    "gmm-2class": {"kind": "two-class", "d": 16, "m_norm": 4.0, "s": math.sqrt(0.5)},
    # 10 equal-weight modes on a sphere of radius 4, isotropic variance 0.25 (mode coverage)
    "gmm-10mode": {"kind": "modes", "d": 16, "n_modes": 10, "radius": 4.0, "s": 0.5, "seed": 0},
}


RECIPE_KINDS = {"gaussian": ({"d", "lam_max", "lam_min"}, {"lam"}), "two-class": ({"d", "m_norm", "s"}, set()),
                "modes": ({"d", "n_modes", "radius", "s"}, set()), "gmm": ({"means"}, set())}
"""kind -> (keys that define it, alternative defining keys)."""


def _shape(v) -> tuple:
    shape = []
    while isinstance(v, list):
        shape.append(len(v))
        v = v[0] if v else None
    return tuple(shape)


def _numbers(where: str, key: str, value, shape=None):
    """``value`` as a float array (NaN, inf, strings, booleans, ragged lists refused, naming ``key``)."""
    import numpy as np

    def leaves(v):
        return [x for item in v for x in leaves(item)] if isinstance(v, list) else [v]

    items = leaves(value)
    bad = [x for x in items if isinstance(x, bool) or not isinstance(x, (int, float))]
    if bad:
        raise ValueError(f"{where}: {key} holds {bad[0]!r}; expected numbers")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except ValueError:
        raise ValueError(f"{where}: {key} is a ragged nested list; expected shape {shape or 'rectangular'}") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: {key} holds NaN or infinite values")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{where}: {key} has shape {arr.shape}; expected {tuple(shape)}")
    return arr


def _positive_int(where: str, key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {key}={value!r}; expected an integer >= {minimum}")
    return value


def _check_values(recipe: dict, kind: str, where: str) -> None:
    """Finite numbers, dimensions >= 1, variances >= 0, covariances symmetric positive semi-definite, U orthogonal
    (numpy, no torch): a world that would be silently clamped or give NaN data is refused naming the key."""
    import numpy as np

    if kind == "gaussian":
        if "lam" in recipe:
            lam = _numbers(where, "lam", recipe["lam"])
            if lam.ndim != 1 or lam.size < 1:
                raise ValueError(f"{where}: lam has shape {lam.shape}; expected (d,) with d >= 1")
            if (lam < 0).any():
                raise ValueError(f"{where}: lam holds {lam.min():g} < 0: the eigenvalues of a covariance are >= 0")
            d = lam.size
        else:
            d = _positive_int(where, "d", recipe["d"])
            hi, lo = (float(_numbers(where, k, recipe[k])) for k in ("lam_max", "lam_min"))
            if not 0 < lo <= hi:
                raise ValueError(f"{where}: lam_max={hi:g}, lam_min={lo:g}; expected 0 < lam_min <= lam_max")
        if recipe.get("U") is not None:
            U = _numbers(where, "U", recipe["U"], (d, d))
            if not np.allclose(U.T @ U, np.eye(d), atol=1e-6):
                raise ValueError(f"{where}: U is not orthogonal (max |U^T U - I| = {np.abs(U.T @ U - np.eye(d)).max():.2g})")
        if recipe.get("mean") is not None:
            _numbers(where, "mean", recipe["mean"], (d,))
        if recipe.get("basis_seed") is not None:
            _positive_int(where, "basis_seed", recipe["basis_seed"], 0)
        return
    if kind in ("two-class", "modes"):
        _positive_int(where, "d", recipe["d"])
        if kind == "modes":
            _positive_int(where, "n_modes", recipe["n_modes"])
            _numbers(where, "radius", recipe["radius"])
            _positive_int(where, "seed", recipe.get("seed", 0), 0)
        else:
            _numbers(where, "m_norm", recipe["m_norm"])
        if float(_numbers(where, "s", recipe["s"])) < 0:
            raise ValueError(f"{where}: s={recipe['s']!r}; a standard deviation is >= 0")
        if recipe.get("weights") is not None:
            w = _numbers(where, "weights", recipe["weights"], (2,) if kind == "two-class" else (int(recipe["n_modes"]),))
            if (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"{where}: weights {w.tolist()} must be >= 0 with a positive sum")
        return
    means = _numbers(where, "means", recipe["means"])
    K, d = means.shape
    if "weights" in recipe:
        w = _numbers(where, "weights", recipe["weights"], (K,))
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"{where}: weights {w.tolist()} must be >= 0 with a positive sum")
    if "variances" in recipe:
        v = _numbers(where, "variances", recipe["variances"])
        if (v < 0).any():
            raise ValueError(f"{where}: variances hold {v.min():g} < 0; a variance is >= 0")
    if "covs" in recipe:
        covs = _numbers(where, "covs", recipe["covs"])
        covs = covs[None] if covs.ndim == 2 else covs
        for k, c in enumerate(covs):
            scale = max(float(np.abs(c).max()), 1e-300)
            if np.abs(c - c.T).max() > 1e-8 * scale:
                raise ValueError(f"{where}: covs[{k}] is not symmetric (max |C - C^T| = {np.abs(c - c.T).max():.3g})")
            low = float(np.linalg.eigvalsh(c).min())
            if low < -1e-10 * scale:
                raise ValueError(f"{where}: covs[{k}] is not positive semi-definite (smallest eigenvalue {low:.4g}); "
                                 "a covariance must be, and trajlab does not clamp it")


def check_recipe(recipe: dict, where: str) -> dict:
    """Check a world recipe (no torch): its keys and array shapes, finite numbers, dimensions >= 1, variances
    >= 0, covariances symmetric positive semi-definite, an orthogonal ``U``; returns it. Raises ValueError (one
    line) naming the key, its shape or value and what was expected."""
    if not isinstance(recipe, dict):
        raise ValueError(f"{where}: expected a table of keys (kind, means, ...), got {type(recipe).__name__}")
    kind = recipe.get("kind", "gaussian" if "lam" in recipe else "gmm")
    if kind not in RECIPE_KINDS:
        raise ValueError(f"{where}: kind={kind!r}; expected one of {sorted(RECIPE_KINDS)}")
    need, alt = RECIPE_KINDS[kind]
    if not (need <= set(recipe) or (alt and alt <= set(recipe))):
        raise ValueError(f"{where}: kind {kind!r} needs keys {sorted(need)}" + (f" (or {sorted(alt)})" if alt else ""))
    if kind == "gmm":
        ms = _shape(recipe["means"])
        if len(ms) != 2 or 0 in ms:
            raise ValueError(f"{where}: means has shape {ms}; expected (K, d) nested lists with K, d >= 1")
        K, d = ms
        if "weights" in recipe and _shape(recipe["weights"]) != (K,):
            raise ValueError(f"{where}: weights has shape {_shape(recipe['weights'])}; expected ({K},)")
        if "covs" in recipe and _shape(recipe["covs"]) not in ((K, d, d), (d, d)):
            raise ValueError(f"{where}: covs has shape {_shape(recipe['covs'])}; expected ({K}, {d}, {d}) or ({d}, {d})")
        if "variances" in recipe and _shape(recipe["variances"]) not in ((), (K,)):
            raise ValueError(f"{where}: variances has shape {_shape(recipe['variances'])}; expected () or ({K},)")
        if "covs" not in recipe and "variances" not in recipe:
            raise ValueError(f"{where}: a gmm recipe needs covs (K, d, d) or variances (K,) / scalar")
    _check_values(recipe, kind, where)
    return recipe


def exact_recipe(spec: str):
    """What follows ``exact:``: a preset name (returned as is), a JSON recipe, or a TOML file with one."""
    import json
    import tomllib
    from pathlib import Path

    spec = spec.split(":", 1)[1] if spec.startswith("exact:") else spec
    if spec in EXACT_WORLDS:
        return spec
    if spec.strip().startswith("{"):
        try:
            recipe = json.loads(spec)
        except ValueError as exc:
            raise ValueError(f"exact world JSON: malformed ({exc})") from None
        return check_recipe(recipe, "exact world JSON")
    p = Path(spec).expanduser()
    if p.suffix == ".toml":
        if not p.is_file():
            raise ValueError(f"exact world file {spec}: no such file")
        data = p.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise ValueError(f"exact world file {spec}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); "
                             "save it as UTF-8") from None
        try:
            recipe = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"exact world file {spec}: malformed TOML: {exc}") from None
        return check_recipe(recipe, f"exact world file {spec}")
    raise ValueError(f"unknown exact world {spec!r}; presets: {sorted(EXACT_WORLDS)}, or a JSON recipe, or a .toml file")
