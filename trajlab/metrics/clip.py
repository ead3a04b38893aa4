"""CLIP embeddings, CLIP score and CLIP feature variance.

An `Embedder` is two plain functions: embed_images(uint8 (N, H, W, 3)) -> (N, D) and
embed_texts(list of N str) -> (N, D). Build one from any (model, preprocess, tokenizer) triple
with `embedder_from_model` (open_clip convention: model.encode_image / model.encode_text,
tokenizer(list[str]) -> LongTensor), e.g. `trajlab.models.micro.load_micro_clip()`, or load an
open_clip model from the local cache with `load_clip` (never downloads).

Metrics use unit-normalised embeddings:
- CLIP score = mean over samples of max(100 cos(e_img, e_txt), 0), in [0, 100]: each sample is clipped
  at 0 before the mean (as Hessel et al. 2021, who also scale by 2.5; torchmetrics' CLIPScore instead
  clips the mean, max(100 mean cos, 0): the two differ when some cosines are negative).
- CLIP feature variance = the unbiased sample variance of the unit embeddings,
  1/(n-1) sum_i ||e_i - e_bar||^2 = n/(n-1) (1 - ||e_bar||^2), so groups of different n compare.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import xarray as xr

from trajlab.metrics.images import check_images, iter_image_batches, resize, to_tensor
from trajlab.metrics.lpips_diversity import MissingWeightsError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Embedder:
    """embed_images: uint8 (N, H, W, 3) -> (N, D); embed_texts: list of N str -> (N, D)."""
    embed_images: Callable[[np.ndarray], np.ndarray]
    embed_texts: Callable[[Sequence[str]], np.ndarray]
    name: str = "custom"


def _as_2d(x, name: str) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a.astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} has shape {a.shape}; expected (N, D)")
    return a


def unit(x, name: str = "embeddings") -> np.ndarray:
    """Rows of (N, D) scaled to unit L2 norm (float64); zero rows raise."""
    a = _as_2d(x, name)
    n = np.linalg.norm(a, axis=1, keepdims=True)
    if np.any(n == 0):
        raise ValueError(f"{name} of shape {a.shape} has {int((n == 0).sum())} zero rows")
    return a / n


def clip_scores(image_emb, text_emb) -> np.ndarray:
    """(N,) max(100 cos, 0) between image_emb (N, D) and text_emb (N, D) or (1, D)."""
    a, b = unit(image_emb, "image_emb"), unit(text_emb, "text_emb")
    if b.shape[0] not in (1, a.shape[0]) or b.shape[1] != a.shape[1]:
        raise ValueError(f"text_emb has shape {b.shape}; expected (1, {a.shape[1]}) or {a.shape}")
    return np.maximum(100.0 * np.sum(a * b, axis=1), 0.0)


def clip_variance(image_emb) -> float:
    """Unbiased variance 1/(N-1) sum_i ||e_i - e_bar||^2 of unit-normalised (N, D) embeddings (N >= 2)."""
    e = unit(image_emb, "image_emb")
    if e.shape[0] < 2:
        raise ValueError(f"image_emb has shape {e.shape}; a variance needs N >= 2 embeddings")
    return float(np.sum((e - e.mean(0)) ** 2) / (e.shape[0] - 1))


def clip_variance_replicates(image_emb, idx) -> np.ndarray:
    """(B,) :func:`clip_variance` of the resampled embedding sets ``image_emb[idx[b]]`` (idx (B, m), m >= 2)."""
    e = unit(image_emb, "image_emb")[np.asarray(idx)]  # (B, m, D)
    if e.ndim != 3 or e.shape[1] < 2:
        raise ValueError(f"idx selects {e.shape[1:2]} embeddings per set; a variance needs m >= 2")
    return np.sum((e - e.mean(axis=1, keepdims=True)) ** 2, axis=(1, 2)) / (e.shape[1] - 1)


# --- building embedders -------------------------------------------------------------------

def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def tensor_preprocess(images: np.ndarray, size: int | tuple[int, int], mean=OPENAI_MEAN,
                      std=OPENAI_STD, device="cpu") -> torch.Tensor:
    """Batched CLIP preprocessing on `device`: resize the short side to size (bicubic,
    antialiased), centre crop, normalise. uint8 (N, H, W, 3) -> float (N, 3, h, w)."""
    x = to_tensor(images, device=device)
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    s = max(th / h, tw / w)
    nh, nw = max(th, round(h * s)), max(tw, round(w * s))
    x = resize(x, (nh, nw), mode="bicubic").clamp(0, 1)
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[..., top:top + th, left:left + tw]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd


def embedder_from_model(model, preprocess=None, tokenizer=None, batch_size: int = 32,
                        image_size=None, mean=None, std=None, name: str = "custom") -> Embedder:
    """Embedder from a (model, preprocess, tokenizer) triple; runs on the model's device.

    preprocess: callable on one PIL image -> (3, h, w) tensor (open_clip style), or None for
    batched tensor preprocessing (tensor_preprocess) with image_size / mean / std taken from the
    arguments, else model.visual.preprocess_cfg, else 224 px and OpenAI mean/std.
    tokenizer: list[str] -> LongTensor (N, L); required for embed_texts.
    """
    if not hasattr(model, "encode_image"):
        raise TypeError(f"model {type(model).__name__} has no encode_image; expected an open_clip-style model")
    cfg = dict(getattr(getattr(model, "visual", model), "preprocess_cfg", {}) or {})
    size = image_size or cfg.get("size") or getattr(getattr(model, "visual", None), "image_size", None) or 224
    size = tuple(size) if isinstance(size, (list, tuple)) else int(size)
    mean = tuple(mean or cfg.get("mean") or OPENAI_MEAN)
    std = tuple(std or cfg.get("std") or OPENAI_STD)

    @torch.no_grad()
    def embed_images(images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        dev = _model_device(model)
        out = []
        for s in range(0, len(images), batch_size):
            chunk = images[s:s + batch_size]
            if preprocess is None:
                x = tensor_preprocess(chunk, size, mean, std, device=dev)
            else:
                from PIL import Image
                x = torch.stack([preprocess(Image.fromarray(im)) for im in chunk]).to(dev)
            p = next(model.parameters(), None)
            x = x.to(p.dtype) if p is not None else x
            out.append(model.encode_image(x).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0))

    @torch.no_grad()
    def embed_texts(texts: Sequence[str]) -> np.ndarray:
        if tokenizer is None:
            raise ValueError("tokenizer is None; embed_texts needs a tokenizer (list[str] -> LongTensor)")
        texts = list(texts)
        dev = _model_device(model)
        out = []
        for s in range(0, len(texts), batch_size):
            out.append(model.encode_text(tokenizer(texts[s:s + batch_size]).to(dev)).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0))

    return Embedder(embed_images, embed_texts, name)


def _hf_cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_clip_weights(model_name: str = "ViT-B-32", pretrained: str = "openai",
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """Local file of open_clip weights for (model_name, pretrained tag or file path).

    Looks in the HF hub cache (cache_dir, else $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub)
    for the tag's repo, then in open_clip's URL cache (cache_dir or ~/.cache/clip). Never
    downloads; raises MissingWeightsError naming the repo/url, file names and searched places.
    """
    import open_clip
    if os.path.isfile(str(pretrained)):
        return Path(pretrained)
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ValueError(f"pretrained={pretrained!r} is neither a file nor a known open_clip tag for "
                         f"{model_name!r}; tags: {open_clip.list_pretrained_tags_by_model(model_name)}")
    hub = _hf_cache_dir(cache_dir)
    looked = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        repo, fname = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file"
        names = (fname,) if fname else _HF_FILES
        for fn in names:
            p = try_to_load_from_cache(repo, fn, cache_dir=str(hub))
            if isinstance(p, str) and os.path.isfile(p):
                return Path(p)
        looked.append(f"HF repo {repo!r} file {' or '.join(names)} in HF cache {hub}")
    if cfg.get("url"):
        clip_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "clip"
        p = clip_dir / os.path.basename(cfg["url"])
        if p.is_file():
            return p
        looked.append(f"{cfg['url']} saved as {p}")
    raise MissingWeightsError(
        f"open_clip weights for {model_name!r} pretrained={pretrained!r} not found locally (no "
        f"download is attempted). Download one of: " + "; ".join(looked) +
        ". Or pass pretrained=<local file>, or pretrained=None for random weights (tests only).")


def load_clip(model_name: str = "ViT-B-32", pretrained: str | None = "openai", device="cpu",
              cache_dir: str | os.PathLike | None = None, batch_size: int = 32) -> Embedder:
    """Embedder for an open_clip model from local weights (see resolve_clip_weights).

    pretrained: a tag ("openai", "laion2b_s34b_b79k", ...), a local file, or None (random weights,
    explicit, for tests).
    """
    import open_clip
    kwargs = {}
    path = None
    if pretrained is not None:
        path = resolve_clip_weights(model_name, pretrained, cache_dir)
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        kwargs = dict(force_quick_gelu=bool(cfg.get("quick_gelu", False)))
        for k_src, k_dst in (("mean", "image_mean"), ("std", "image_std"),
                             ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
            if cfg.get(k_src) is not None:
                kwargs[k_dst] = cfg[k_src]
    if path is not None and path.suffix == ".pt" and pretrained == "openai":
        from open_clip.openai import load_openai_model
        model = load_openai_model(str(path), device=device, jit=False)
    else:
        model, _, _ = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path) if path is not None else None, device=device, **kwargs)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return embedder_from_model(model, None, tokenizer, batch_size=batch_size,
                               name=f"{model_name}:{pretrained}")


# --- streaming over stores ----------------------------------------------------------------

def embed_store_images(embedder: Embedder, ds: xr.Dataset, batch_size: int = 32,
                       var: str = "image") -> xr.DataArray:
    """Image embeddings of every sample, streamed in batches: DataArray (sample, feature)."""
    parts, idxs = [], []
    for idx, imgs in iter_image_batches(ds, batch_size, var=var):
        parts.append(_as_2d(embedder.embed_images(imgs), "embed_images output"))
        idxs.append(idx)
    E = np.concatenate(parts)
    out = np.empty_like(E)
    out[np.concatenate(idxs)] = E
    coords = {k: ds[k] for k in ("prompt_index", "seed") if k in ds.coords}
    return xr.DataArray(out, dims=("sample", "feature"), coords=coords, name="image_embedding",
                        attrs={"embedder": embedder.name})
