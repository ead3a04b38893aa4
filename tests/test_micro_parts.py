"""Pieces of the micro-world against the diffusers / open_clip code they must agree with."""

import copy

import numpy as np
import torch

from trajlab.models.micro import data as D
from trajlab.models.micro import distill as LCM
from trajlab.models.micro import lora as LO
from trajlab.models.micro import teacher as T


def test_split_is_fixed_disjoint_and_complete():
    tr, ho = D.split_indices(1797)
    tr2, ho2 = D.split_indices(1797)
    assert np.array_equal(tr, tr2) and np.array_equal(ho, ho2)
    assert len(np.intersect1d(tr, ho)) == 0 and len(tr) + len(ho) == 1797
    s = D.load_split()
    assert s["x_train"].shape[1:] == (3, 32, 32) and s["x_held"].shape[0] == len(ho)
    assert s["x_train"].min() >= -1 and s["x_train"].max() <= 1
    assert torch.equal(s["x_train"][:, 0], s["x_train"][:, 2])  # grey in RGB


def test_augment_shifts_but_keeps_range_and_ink():
    x, _ = D.load_digits_rgb()
    a = D.augment(x[:64], torch.Generator().manual_seed(0))
    assert a.shape == x[:64].shape and a.min() >= -1 and a.max() <= 1
    assert (a - x[:64]).abs().mean() > 0.01  # it moved
    assert abs(a.mean() - x[:64].mean()) < 0.1  # small shifts/scales keep the amount of ink
    b = D.augment(x[:64], torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_prompts():
    assert D.PROMPTS[7] == "a handwritten digit 7"
    v = D.prompt_variants(3)
    assert v[0] == D.PROMPTS[3] and "the number three" in v and len(set(v)) == len(v)
    texts = D.all_prompt_texts()
    assert texts[-1] == "" and len(texts) == 10 * len(D.TEMPLATES) + 1
    p = D.sample_prompts(torch.tensor([1] * 200), torch.Generator().manual_seed(0), p_drop=0.5)
    assert 60 < sum(t == "" for t in p) < 140 and all(t in D.prompt_variants(1) + [""] for t in p)


def test_guidance_embedding_and_boundary_scalings_match_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([1.0, 3.0, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    assert torch.allclose(LCM.guidance_scale_embedding(w, 32), ref, atol=1e-6)
    sched = LCM.lcm_scheduler()
    for t in [0, 19, 259, 999]:
        cs, co = LCM.boundary_scalings(torch.tensor([t]))
        rs, ro = sched.get_scalings_for_boundary_condition_discrete(t)
        assert abs(cs.item() - rs) < 1e-6 and abs(co.item() - ro) < 1e-6
    sched.set_timesteps(50)
    assert sorted(sched.timesteps.tolist()) == LCM.ddim_grid().tolist()


def test_alphas_cumprod_is_sds():
    from diffusers import DDIMScheduler

    ref = T.ddim_scheduler().alphas_cumprod
    assert torch.allclose(T.alphas_cumprod(), ref, atol=1e-6)
    assert isinstance(T.ddim_scheduler(), DDIMScheduler)


def test_lora_export_fuse_matches_wrapped_forward():
    unet = T.build_unet(seed=0).eval()
    student = copy.deepcopy(unet)
    wrapped = LO.inject_lora(student, r=4)
    assert any(isinstance(w.base, torch.nn.Conv2d) for w in wrapped.values()) and any(isinstance(w.base, torch.nn.Linear) for w in wrapped.values())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in wrapped.values():
            w.lora_B.weight.copy_(0.05 * torch.randn(w.lora_B.weight.shape, generator=g))
    z, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref = student(z, t, encoder_hidden_states=c).sample
        base = unet(z, t, encoder_hidden_states=c).sample
    sd = LO.export_state_dict(wrapped, dtype=torch.float32)
    assert all(k.startswith("unet.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")) for k in sd)
    assert LO.fuse_lora(unet, sd) == len(wrapped)
    with torch.no_grad():
        fused = unet(z, t, encoder_hidden_states=c).sample
    assert (ref - base).abs().max() > 1e-3
    assert torch.allclose(fused, ref, atol=1e-4), (fused - ref).abs().max()


def test_text_encoder_conversion_exact_on_random_clip():
    from trajlab.models.micro import scorer as S
    from trajlab.models.tokenizer import clip_tokenizer

    m = S.build_clip(seed=5).eval()
    with torch.no_grad():
        m.token_embedding.weight.normal_(0, 0.02)  # make every token informative for the check
    te = S.text_encoder_from_clip(m)
    ids = clip_tokenizer()(["a handwritten digit 3", "a photo of an astronaut"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h = te(ids).last_hidden_state
        x = m.ln_final(m.transformer(m.token_embedding(ids) + m.positional_embedding, attn_mask=m.attn_mask))
        pooled = m.encode_text(S.tokenize(["a handwritten digit 3", "a photo of an astronaut"]))
        eot = ids.argmax(-1)
    assert torch.allclose(h, x, atol=1e-5)
    assert torch.allclose(h[torch.arange(2), eot] @ m.text_projection, pooled, atol=1e-5)


def test_nearest_distances_and_summary():
    from trajlab.models.micro.quality import nearest_distances, summary

    x, _ = D.load_digits_rgb()
    ref = x[:100]
    d_self = nearest_distances(ref[:10], ref)
    assert np.allclose(d_self, 0, atol=1e-5)
    d_other = nearest_distances(x[100:140], ref)
    assert (d_other > 0.1).all()
    s = summary(d_other)
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"]
