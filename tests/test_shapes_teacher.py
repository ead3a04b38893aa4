"""The shapes world's teacher (shapes-sd): its parts, training loop (CFG dropout, resumable), the shipped weights
loading through stock diffusers pipelines and the registry, and the quality scoring."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trajlab.worlds import shapes as W
from trajlab.worlds import world_path
from trajlab.worlds.shapes import quality as Q
from trajlab.worlds.shapes import scores as S
from trajlab.worlds.shapes import teacher as T

SHIPPED = world_path("shapes/shapes-sd")


@pytest.fixture(scope="module")
def tiny_text():
    from trajlab.models.tokenizer import clip_tokenizer
    from trajlab.worlds.shapes import clip as C

    model = C.build_clip(seed=0)
    from trajlab.models.micro.scorer import text_encoder_from_state_dict

    te = text_encoder_from_state_dict(model.state_dict(), text_cfg=C.CONFIG["text_cfg"], embed_dim=C.CONFIG["embed_dim"])
    return model, te, clip_tokenizer(model_max_length=C.CONTEXT)


def test_text_encoder_is_the_clip_text_tower(tiny_text):
    """The converted CLIPTextModel's state at the end token, projected, is open_clip's text embedding."""
    model, te, tok = tiny_text
    from trajlab.worlds.shapes import clip as C

    text = "a large red striped square to the left of a small blue circle"
    ids = tok([text], padding="max_length", max_length=C.CONTEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        hf = te(ids)[0]
        eot = int((ids[0] == 49407).nonzero()[0])
        ours = hf[0, eot] @ model.text_projection
        ref = model.encode_text(C.tokenize([text]))[0]
    assert hf.shape == (1, C.CONTEXT, C.CONFIG["text_cfg"]["width"])
    assert torch.allclose(ours, ref, atol=1e-4)


def test_unused_token_rows_start_at_zero(tiny_text):
    model, _, _ = tiny_text
    from trajlab.worlds.shapes import clip as C

    emb = model.token_embedding.weight
    used = C.tokenize(C.grammar_words() + [""]).unique()
    assert (emb[used].abs().sum(1) > 0).all()
    assert int((emb.abs().sum(1) > 0).sum()) == len(used)


def test_vae_and_unet_shapes():
    vae, unet = T.build_vae(seed=0), T.build_unet(seed=0)
    x = T.scene_images(2, 0)[1]
    z = vae.encode(x).latent_dist.mean
    assert z.shape == (2, T.LATENT_CHANNELS, T.LATENT_SIZE, T.LATENT_SIZE)
    out = unet(z, torch.tensor([10, 900]), encoder_hidden_states=torch.zeros(2, 5, T.CROSS_DIM)).sample
    assert out.shape == z.shape
    assert vae.decode(z).sample.shape == x.shape


def test_caption_sampler_follows_the_grammar_and_drops_for_cfg(tiny_text):
    _, te, tok = tiny_text
    scenes = W.sample_scenes(200, 3)
    cs = T.ScenePrompts(scenes, te, tok, seed=0, p_drop=0.25)
    texts = cs.texts(range(200)) + cs.texts(range(200))
    empty = [t for t in texts if t == ""]
    assert 0.15 < len(empty) / len(texts) < 0.35
    for i, t in enumerate(texts):
        if t:
            spec = W.parse(t)  # in the grammar
            sc = scenes[i % 200]
            assert len(spec["objects"]) == len(sc["objects"])
            for o, so in zip(spec["objects"], sc["objects"]):
                assert all(o[a] is None or o[a] == so[a] for a in ("shape", "colour", "size", "texture"))
    states = cs([0, 1, 2])
    assert states.shape == (3, tok.model_max_length, T.CROSS_DIM)


def test_teacher_training_resumes_to_the_same_weights(tmp_path, tiny_text):
    """Two steps, a checkpoint, two more steps == four steps uninterrupted (same seeds, same schedule)."""
    _, te, tok = tiny_text
    scenes = W.sample_scenes(16, 1)
    z = torch.randn(16, T.LATENT_CHANNELS, T.LATENT_SIZE, T.LATENT_SIZE, generator=torch.Generator().manual_seed(0))

    def go(ckpt):
        unet = T.build_unet(seed=1)
        cs = T.ScenePrompts(scenes, te, tok, seed=2)
        return T.train_unet(unet, z, cs, steps=4, batch=4, seed=3, checkpoint=ckpt, every=2)

    ema_a, losses_a = go(tmp_path / "a.ckpt")
    assert (tmp_path / "a.ckpt").exists()  # written at step 2, not removed by the loop itself
    st = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert st["step"] == 2 and len(st["losses"]) == 2
    ema_b, losses_b = go(tmp_path / "a.ckpt")  # resumes at step 2
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    for pa, pb in zip(ema_a.parameters(), ema_b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def _perfect_reading(scene):
    objs = W.canonical_objects(scene)
    return {"count": len(objs), "axis": W.scene_axis(scene), "objects": [dict(o) for o in objs], "confidence": 1.0}


def test_leftout_tv_matches_scores_and_separates_prior_from_collapse():
    """Readings of scenes drawn from a prompt's own law give a TV near the noise floor; one value always
    gives the exact TV 1 - p(value)."""
    prompts = ["a shape", "a red shape"]
    by_prompt = []
    for p in prompts:
        spec = W.parse(p)
        scenes = [s for s in W.sample_scenes(4000, 5) if len(s["objects"]) == 1]
        ok = [s for s in scenes if all(spec["objects"][0][a] in (None, s["objects"][0][a]) for a in ("shape", "colour"))]
        by_prompt.append([_perfect_reading(s) for s in ok[:300]])
    sec = Q.leftout_section(prompts, by_prompt, draws=50)
    shape = sec["per_attribute"]["shape"]
    assert shape["tv"] < 0.08 and shape["bootstrap95"][0] <= shape["tv"] <= shape["bootstrap95"][1]
    flat_p = [p for p, rs in zip(prompts, by_prompt) for _ in rs]
    flat_r = [r for rs in by_prompt for r in rs]
    assert shape["tv"] == pytest.approx(S.score(flat_p, flat_r)["leftout_pooled"]["shape"]["tv"])
    collapsed = [[{**r, "objects": [{**r["objects"][0], "shape": "square"}]} for r in rs] for rs in by_prompt]
    sec2 = Q.leftout_section(prompts, collapsed, draws=20)
    assert sec2["per_attribute"]["shape"]["tv"] == pytest.approx(1 - W.PRIORS["shape"]["square"])


def test_verdicts_mark_hits_and_misses():
    res = {"single_full_alignment": {"rate": 0.95}, "two_binding": {"rate": 0.5}, "two_relation": {"rate": 0.6},
           "texture": {"rate": 0.84}, "leftout_tv_max": {"tv": 0.12}}
    v = Q.verdicts(res)
    assert v["single_full_alignment"]["hit"] and v["two_relation"]["hit"]
    assert not v["two_binding"]["hit"] and not v["texture"]["hit"] and not v["leftout_tv_max"]["hit"]


def test_prompt_sets_are_in_the_grammar_and_large_enough():
    assert sum(len(v) for v in Q.PROMPT_SETS.values()) >= 20
    for name, prompts in Q.PROMPT_SETS.items():
        for p in prompts:
            spec = W.parse(p)
            if name == "single_full":
                assert len(spec["objects"]) == 1 and all(v is not None for v in spec["objects"][0].values())
            if name == "two_full":
                assert spec["relation"] is not None and all(v is not None for o in spec["objects"] for a, v in o.items() if a != "position")
            if name == "leftout":
                d = W.prompt_distribution(p)
                assert any(len(slot[a]) > 1 for slot in d["slots"] for a in ("shape", "colour", "size", "texture"))


def test_registry_names_the_shipped_teacher():
    from trajlab.models.loading import ModelNotAvailable, resolve_source
    from trajlab.models.registry import get

    spec = get("shapes-sd")
    assert spec is not None and spec.pipeline == "StableDiffusionPipeline" and spec.source == "world:shapes/shapes-sd"
    assert Path(resolve_source(spec.source)) == SHIPPED
    with pytest.raises(ModelNotAvailable, match="expected WORLD/NAME"):
        resolve_source("world:../shapes")
    with pytest.raises(ModelNotAvailable, match="make train-world"):
        resolve_source("world:shapes/no-such-model")


def test_shipped_teacher_loads_with_stock_from_pretrained():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED))
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.tokenizer.model_max_length == 32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    pipe.set_progress_bar_config(disable=True)
    im = pipe(["a large red solid square in the centre", "a small blue striped circle"], height=16, width=16, num_inference_steps=2,
              guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert im.shape == (2, 16, 16, 3) and np.isfinite(im).all() and im.std() > 0.01
    info = json.loads((SHIPPED / "trajlab.json").read_text())
    assert info["world"] == "shapes" and info["steps"] == 30


def test_shipped_text_encoder_is_shapes_clip_text_tower():
    from transformers import CLIPTextModel

    from trajlab.worlds.shapes import clip as C

    te = CLIPTextModel.from_pretrained(str(SHIPPED / "text_encoder"))
    ref = C.text_encoder_from_file(world_path("shapes/shapes-clip"))
    ids = torch.tensor([[49406, 320, 3638, 736, 49407] + [49407] * 27])
    with torch.no_grad():
        assert torch.allclose(te(ids)[0], ref(ids)[0], atol=1e-5)


def test_shipped_quality_file_states_its_hits_and_misses():
    """quality.json's verdicts are the targets applied to its own numbers, with the command and the machine load."""
    doc = json.loads((SHIPPED.parent / "quality.json").read_text())
    assert doc["targets"] == Q.verdicts(doc["results"])
    assert set(doc["targets"]) == set(Q.TARGETS)
    assert doc["samples_per_prompt"]["single_full"] >= 16 and sum(len(v) for v in doc["prompts"].values()) >= 20
    assert doc["command"].startswith(Q.COMMAND) and len(doc["run"]["load_average_start"]) == 3
    tv = doc["results"]["leftout"]["per_attribute"]
    assert doc["results"]["leftout_tv_max"]["tv"] == pytest.approx(max(v["tv"] for v in tv.values()))
