"""The real-data reference the modes compare against: modes inside a prompt, ink mass, the spectral band
of fine detail, and the diversity distance of a store.

- Modes inside a prompt: k-means (k = 4) clusters of the real data of the prompted class when the store is
  a micro-world store (:func:`micro_data_reference`), else of the reference group's own samples.
- Diversity: micro-LPIPS (:mod:`trajlab.metrics.world_lpips`: LPIPS's formula with uniform weights on the
  shipped labeller CNN's conv stages; not human-calibrated) on micro-world stores, else the pixel
  substitute (:data:`trajlab.verdicts.matching.PIXEL_DIVERSITY`).
"""
from __future__ import annotations

import numpy as np

from trajlab.analysis import sweeps as S
from trajlab.verdicts.matching import FEATURES, PIXEL_DIVERSITY, features, grey, pixel_pairwise


def reference_modes_from(images: np.ndarray, labels: np.ndarray, texts_of, k: int = 4, seed: int = 0) -> dict:
    """{prompt text: (k, f) centroids, most populous first}: k-means on the real images of each class
    (features as :func:`trajlab.verdicts.matching.grey`). texts_of(label) -> the prompt texts of that class."""
    from sklearn.cluster import KMeans

    out = {}
    for lab in np.unique(labels):
        x = grey(images[labels == lab]).reshape(int((labels == lab).sum()), -1)
        km = KMeans(k, n_init=10, random_state=seed).fit(x)
        centres = km.cluster_centers_[np.argsort(-np.bincount(km.labels_, minlength=k), kind="stable")]
        for text in texts_of(lab):
            out[text] = centres
    return out


def modes_of_group(ds, pairs, k: int = 4) -> dict:
    """{prompt: (k, f) centroids, most populous first}: k-means of a group's own samples (no real data)."""
    from sklearn.cluster import KMeans

    out = {}
    for text, ia, _, _ in pairs:
        x = features(ds, ia)
        km = KMeans(min(k, len(x)), n_init=10, random_state=0).fit(x)
        out[text] = km.cluster_centers_[np.argsort(-np.bincount(km.labels_), kind="stable")]
    return out


def band_fraction(images: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Per image: fraction of (non-DC) spectral power of the grey image at radial frequency in ``band``
    (cycles per pixel of the stored image)."""
    x = np.asarray(images, dtype=np.float64).mean(-1) / 255.0
    x = x - x.mean((1, 2), keepdims=True)
    P = np.abs(np.fft.fft2(x)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(x.shape[1]), np.fft.fftfreq(x.shape[2]), indexing="ij")
    r = np.hypot(fy, fx)
    inb = (r >= band[0]) & (r < band[1])
    return P[:, inb].sum(1) / np.maximum(P.sum((1, 2)), 1e-12)


def data_band(real_images: np.ndarray) -> tuple[float, float]:
    """The band between the radii holding 50% and 95% of the real data's (non-DC) spectral power."""
    x = np.asarray(real_images, dtype=np.float64).mean(-1) / 255.0
    x = x - x.mean((1, 2), keepdims=True)
    P = (np.abs(np.fft.fft2(x)) ** 2).mean(0)
    fy, fx = np.meshgrid(np.fft.fftfreq(x.shape[1]), np.fft.fftfreq(x.shape[2]), indexing="ij")
    r = np.hypot(fy, fx).ravel()
    order = np.argsort(r, kind="stable")
    c = np.cumsum(P.ravel()[order]) / P.sum()
    return float(r[order][np.searchsorted(c, 0.5)]), float(r[order][np.searchsorted(c, 0.95)] + 1e-9)


def data_reference(images: np.ndarray, labels: np.ndarray, texts_of, note: str, prompts=None) -> dict:
    """{"ink": text -> mean grey level of its class, "band", "modes", "note", "prompts"} from real uint8 images
    (n, H, W, 3) with class labels (n,); texts_of(label) -> the prompt texts asking for that class; prompts: the
    world's whole declared prompt set (a study over exactly it is about those prompts, not a sample), or None."""
    labels = np.asarray(labels)
    ink = {}
    for lab in np.unique(labels):
        m = float(grey(images[labels == lab]).mean())
        for text in texts_of(lab):
            ink[text] = m
    overall = float(grey(images).mean())
    return {"ink": lambda text: ink.get(text, overall), "band": data_band(images),
            "modes": reference_modes_from(images, labels, texts_of), "note": note,
            "prompts": None if prompts is None else tuple(prompts)}


def micro_data_reference() -> dict:
    """The real digits as the micro-world stores them (32 px RGB uint8); the world's prompt set: its 10
    canonical digit prompts."""
    from trajlab.models.micro.data import PROMPTS, load_digits_rgb, prompt_variants, to_uint8_hwc

    x, y = load_digits_rgb()
    return data_reference(to_uint8_hwc(x), np.asarray(y), lambda lab: prompt_variants(int(lab)),
                          "modes, ink mass and spectral band from the real digits (sklearn, 1,797 images)",
                          prompts=PROMPTS)


def shapes_data_reference() -> dict:
    """The shapes world's reference for the verdicts: its attribute judge (alignment, composition, texture, prior and
    negative-prompt modes), its palette distance (cfg_off_palette), shapes-LPIPS for diversity (the judge's conv features). No real-data modes, ink or band here: those modes
    fall back to the teacher's own samples or say why not. Its prompts are a sample of a grammar, not a whole
    prompt set."""
    from trajlab.metrics import world_lpips as WL
    from trajlab.worlds.shapes.judge import load_judge
    from trajlab.worlds.shapes.scores import off_palette

    model = WL.load_shapes_lpips()
    from trajlab.worlds.shapes.students import ABLATIONS

    return {"judge": load_judge(), "off_palette": off_palette, "ablations": ABLATIONS,
            "note": "shapes world: attribute judge (trajlab.worlds.shapes.judge), shapes-LPIPS diversity",
            "diversity": ((lambda images: WL.micro_lpips_pairwise(model, images)),
                          f"mean pairwise {WL.SHAPES_DESCRIPTION} within prompt", WL.SHAPES_DESCRIPTION)}


def diversity_distance(desc: dict, data: dict | None) -> tuple:
    """(pairwise(uint8 images (n, H, W, 3)) -> (n, n) distances, metric name, features name):
    ``data["diversity"]`` when given, micro-LPIPS on micro-world stores (the shipped labeller), else the
    pixel substitute. A micro store without the labeller weights falls back to pixels and says why."""
    if (data or {}).get("diversity") is not None:
        return data["diversity"]
    if S.is_micro(desc):
        try:
            from trajlab.metrics import world_lpips as W

            model = W.load_micro_lpips()
            return ((lambda images: W.micro_lpips_pairwise(model, images)),
                    f"mean pairwise {W.DESCRIPTION} within prompt", W.DESCRIPTION)
        except FileNotFoundError as exc:
            return pixel_pairwise, PIXEL_DIVERSITY, f"{FEATURES}; micro-LPIPS unavailable ({exc})"
    return pixel_pairwise, PIXEL_DIVERSITY, FEATURES


__all__ = ["band_fraction", "data_band", "data_reference", "diversity_distance", "micro_data_reference", "shapes_data_reference",
           "modes_of_group", "reference_modes_from"]
