"""CLIP score / variance on embedders with known alignment; (model, preprocess, tokenizer) path;
weights resolution from the local caches with clear errors."""
import numpy as np
import pytest
import torch

from trajlab.metrics.clip import (Embedder, MissingWeightsError, clip_scores, clip_variance,
                                  embedder_from_model, load_clip, resolve_clip_weights,
                                  tensor_preprocess)

COLOURS = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}


def colour_embedder():
    """Image -> its mean RGB; text -> the unit vector of the colour word. Alignment is known."""
    return Embedder(lambda im: np.asarray(im, float).mean(axis=(1, 2)),
                    lambda texts: np.array([COLOURS[t] for t in texts]), "colour")


def _solid(rgb, n=1, size=8):
    return np.tile(np.array(rgb, np.uint8), (n, size, size, 1))


def test_clip_score_higher_for_aligned_text_and_bounded():
    emb = colour_embedder()
    red = emb.embed_images(_solid([200, 30, 0]))
    scores = {t: clip_scores(red, emb.embed_texts([t]))[0] for t in COLOURS}
    assert scores["red"] > scores["green"] >= scores["blue"]
    cos_red = 200 / np.hypot(200, 30)
    assert abs(scores["red"] - 100 * cos_red) < 1e-9
    assert scores["blue"] == 0.0  # orthogonal -> 0, never negative
    rng = np.random.default_rng(0)
    s = clip_scores(rng.normal(size=(50, 16)), rng.normal(size=(1, 16)))
    assert np.all((s >= 0) & (s <= 100)) and np.any(s == 0) and np.any(s > 0)


def test_clip_variance_is_the_unbiased_variance_and_zero_for_identical():
    rng = np.random.default_rng(1)
    E = rng.normal(size=(20, 8))
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    assert abs(clip_variance(E) - 20 / 19 * (1 - np.sum(U.mean(0) ** 2))) < 1e-12
    # unbiased: the mean over many small samples matches the population variance 1 - ||mu||^2 = 1 here
    small = [clip_variance(rng.normal(size=(3, 8))) for _ in range(4000)]
    assert abs(np.mean(small) - 1.0) < 0.02
    emb = colour_embedder()
    assert clip_variance(emb.embed_images(_solid([10, 200, 40], n=5))) == 0.0
    mixed = np.concatenate([_solid([255, 0, 0], 2), _solid([0, 255, 0], 2)])
    assert abs(clip_variance(emb.embed_images(mixed)) - 4 / 3 * 0.5) < 1e-12  # n/(n-1) (1 - ||(0.5, 0.5, 0)||^2)


class TinyClip(torch.nn.Module):
    """Minimal open_clip-style model: encode_image / encode_text."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(3 * 4 * 4, 8)
        self.txt = torch.nn.Embedding(64, 8)

    def encode_image(self, x):
        return self.img(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))

    def encode_text(self, tokens):
        return self.txt(tokens).mean(1)


def tiny_tokenizer(texts):
    return torch.tensor([[ord(c) % 64 for c in t[:6].ljust(6)] for t in texts])


def test_embedder_from_model_triple_batched_and_pil_paths():
    model = TinyClip().eval()
    rng = np.random.default_rng(2)
    im = rng.integers(0, 256, (5, 20, 24, 3)).astype(np.uint8)
    emb = embedder_from_model(model, None, tiny_tokenizer, batch_size=2, image_size=16)
    with torch.no_grad():
        ref = model.encode_image(tensor_preprocess(im, 16)).numpy()
        ref_t = model.encode_text(tiny_tokenizer(["a cat", "dog"])).numpy()
    assert emb.embed_images(im).shape == (5, 8)
    assert np.allclose(emb.embed_images(im), ref, atol=1e-5)
    assert np.allclose(emb.embed_texts(["a cat", "dog"]), ref_t, atol=1e-6)

    def pil_pre(pil):  # open_clip-style per-image transform
        return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255

    emb2 = embedder_from_model(model, pil_pre, tiny_tokenizer, batch_size=3)
    with torch.no_grad():
        ref2 = model.encode_image(torch.from_numpy(im).permute(0, 3, 1, 2).float() / 255).numpy()
    assert np.allclose(emb2.embed_images(im), ref2, atol=1e-5)


def test_tensor_preprocess_crops_centre():
    im = np.zeros((1, 10, 20, 3), np.uint8)
    im[:, :, 5:15] = 255  # centre 10 columns white
    x = tensor_preprocess(im, 10, mean=(0, 0, 0), std=(1, 1, 1))
    assert x.shape == (1, 3, 10, 10) and float(x.min()) > 0.99


def test_random_open_clip_vit_b_32_offline():
    emb = load_clip("ViT-B-32", pretrained=None)
    im = np.random.default_rng(3).integers(0, 256, (2, 48, 48, 3)).astype(np.uint8)
    E, T = emb.embed_images(im), emb.embed_texts(["a photo of a cat"])
    assert E.shape == (2, 512) and T.shape == (1, 512)
    s = clip_scores(E, T)
    assert np.all((s >= 0) & (s <= 100))


def test_missing_weights_raise_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        load_clip("ViT-B-32", "openai")
    msg = str(err.value)
    assert "timm/vit_base_patch32_clip_224.openai" in msg and str(tmp_path / "hf") in msg
    assert str(tmp_path / ".cache" / "clip" / "ViT-B-32.pt") in msg
    with pytest.raises(MissingWeightsError, match="laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        resolve_clip_weights("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="not-a-tag"):
        resolve_clip_weights("ViT-B-32", "not-a-tag")


def test_weights_found_in_local_hf_cache_and_url_cache(tmp_path):
    repo = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    f = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    assert resolve_clip_weights("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path) == f
    (tmp_path / "ViT-B-32.pt").write_bytes(b"x")  # openai tag: URL-cache file name
    assert resolve_clip_weights("ViT-B-32", "openai", cache_dir=tmp_path) == tmp_path / "ViT-B-32.pt"
