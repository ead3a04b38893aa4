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


def check_recipe(recipe: dict, where: str) -> dict:
    """Check a world recipe's keys and array shapes (no torch); returns it. Raises ValueError naming the
    variable, its shape and what was expected."""
    kind = recipe.get("kind", "gaussian" if "lam" in recipe else "gmm")
    if kind not in RECIPE_KINDS:
        raise ValueError(f"{where}: kind={kind!r}; expected one of {sorted(RECIPE_KINDS)}")
    need, alt = RECIPE_KINDS[kind]
    if not (need <= set(recipe) or (alt and alt <= set(recipe))):
        raise ValueError(f"{where}: kind {kind!r} needs keys {sorted(need)}" + (f" (or {sorted(alt)})" if alt else ""))
    if kind == "gmm":
        ms = _shape(recipe["means"])
        if len(ms) != 2 or 0 in ms:
            raise ValueError(f"{where}: means has shape {ms}; expected (K, d) nested lists")
        K, d = ms
        if "weights" in recipe and _shape(recipe["weights"]) != (K,):
            raise ValueError(f"{where}: weights has shape {_shape(recipe['weights'])}; expected ({K},)")
        if "weights" in recipe and (min(recipe["weights"]) < 0 or sum(recipe["weights"]) <= 0):
            raise ValueError(f"{where}: weights {recipe['weights']} must be >= 0 with a positive sum")
        if "covs" in recipe and _shape(recipe["covs"]) not in ((K, d, d), (d, d)):
            raise ValueError(f"{where}: covs has shape {_shape(recipe['covs'])}; expected ({K}, {d}, {d}) or ({d}, {d})")
        if "variances" in recipe and _shape(recipe["variances"]) not in ((), (K,)):
            raise ValueError(f"{where}: variances has shape {_shape(recipe['variances'])}; expected () or ({K},)")
        if "covs" not in recipe and "variances" not in recipe:
            raise ValueError(f"{where}: a gmm recipe needs covs (K, d, d) or variances (K,) / scalar")
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
        return check_recipe(json.loads(spec), "exact world JSON")
    p = Path(spec).expanduser()
    if p.suffix == ".toml":
        if not p.is_file():
            raise ValueError(f"exact world file {spec}: no such file")
        try:
            recipe = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"exact world file {spec}: malformed TOML: {exc}") from None
        return check_recipe(recipe, f"exact world file {spec}")
    raise ValueError(f"unknown exact world {spec!r}; presets: {sorted(EXACT_WORLDS)}, or a JSON recipe, or a .toml file")
