"""The few-step micro students (micro-pcm, micro-tlcm, micro-turbo, micro-dmd): the shipped weights load
through trajlab's loader by registry name and sample deterministically; each recipe's loss does
what the recipe needs on a tiny batch."""

import copy

import numpy as np
import pytest
import torch

from trajlab.models.micro import PROMPTS, load_labeller, micro_paths
from trajlab.models.micro import data as D
from trajlab.models.micro import lora as LO
from trajlab.models.micro import teacher as T

STUDENTS = ("micro-pcm", "micro-tlcm", "micro-turbo", "micro-dmd")


@pytest.fixture(scope="module")
def shipped():
    """The shipped micro-sd UNet, its text bank and 16 real digit latents."""
    from diffusers import StableDiffusionPipeline

    from trajlab.models.micro import autoencoder as A
    from trajlab.models.micro.train import _text_bank

    sd = StableDiffusionPipeline.from_pretrained(str(micro_paths()["micro-sd"]))
    bank, ids, empty = _text_bank(sd.text_encoder, sd.tokenizer)
    x, y = D.load_digits_rgb()
    z = A.encode(sd.vae, x[:16], sample=False) * sd.vae.config.scaling_factor
    cond = bank[[ids[int(d)][0] for d in y[:16]]]
    return {"sd": sd, "teacher": sd.unet.eval().requires_grad_(False), "z": z, "y": y[:16], "cond": cond, "uncond": bank[empty].expand_as(cond)}


@pytest.mark.parametrize("name", STUDENTS)
def test_student_loads_by_name_and_samples_deterministically(name):
    from trajlab.models import registry as reg
    from trajlab.models.loading import load_pipeline

    spec = reg.get(name)
    assert spec is not None and spec.role == "student", name
    pipe = load_pipeline(name)
    digits = [1, 4, 7]
    kw = {"num_inference_steps": spec.steps, "guidance_scale": spec.guidance, "output_type": "np"}
    a = pipe([PROMPTS[d] for d in digits], generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe([PROMPTS[d] for d in digits], generator=torch.Generator().manual_seed(0), **kw).images
    c = pipe([PROMPTS[d] for d in digits], generator=torch.Generator().manual_seed(1), **kw).images
    assert a.shape == (3, 32, 32, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b), f"{name}: same seed, different images"
    assert np.abs(a - c).max() > 1e-3, f"{name}: the seed does not change the sample"
    labels, _ = load_labeller()((a * 255).round().astype(np.uint8))
    assert (labels == np.array(digits)).mean() >= 2 / 3, f"{name}: labels {labels} for prompted {digits}"


def test_students_differ_from_the_teacher(shipped):
    """Each student's UNet (adapter / swap / full copy) is not micro-sd's."""
    from trajlab.models.loading import load_pipeline

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 499])
    cond = shipped["cond"][:2]
    with torch.no_grad():
        base = shipped["teacher"](x, t, encoder_hidden_states=cond).sample
        for name in STUDENTS:
            out = load_pipeline(name).unet(x, t, encoder_hidden_states=cond).sample
            assert (out - base).abs().max() > 1e-3, f"{name} equals the teacher"


def test_pcm_phase_edges_and_boundary_condition(shipped):
    from trajlab.models.micro import pcm

    t = torch.tensor([0, 19, 259, 279, 499, 519, 759, 779, 999])
    assert pcm.phase_edge(t).tolist() == [0, 0, 0, 259, 259, 499, 499, 759, 759]
    # at a phase's lower edge the DDIM-parameterised student is the identity, whatever its epsilon
    ab = T.alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    a = ab[torch.tensor(pcm.EDGES)].view(-1, 1, 1, 1)
    assert torch.allclose(pcm.ddim_jump(eps, x, a, a), x, atol=1e-5)
    # the consistency target at t_end == s is the teacher's DDIM step itself (no target network): a target
    # network returning garbage must not change the loss of grid points whose step lands on an edge
    j = torch.tensor([0, 12, 24, 37])  # t_start = 19, 259, 499, 759: t_end = 0 (edge), 239, 479, 739
    z, cond, uncond = shipped["z"][:4], shipped["cond"][:4], shipped["uncond"][:4]
    noise = torch.randn(z.shape, generator=g)
    student = shipped["teacher"]

    class Garbage(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states=None):
            return type("O", (), {"sample": torch.full_like(x, 7.0)})()

    with torch.no_grad():
        l_edge = [pcm.phased_consistency_loss(student, student, tgt, z[:1], cond[:1], uncond[:1], j[:1], 3.0, noise[:1], ab)[0]
                  for tgt in (student, Garbage())]
        l_mid = [pcm.phased_consistency_loss(student, student, tgt, z[1:], cond[1:], uncond[1:], j[1:], 3.0, noise[1:], ab)[0]
                 for tgt in (student, Garbage())]
    assert torch.equal(l_edge[0], l_edge[1])
    assert not torch.equal(l_mid[0], l_mid[1])


def test_pcm_loss_falls_with_lora_and_adversarial_term(shipped):
    from trajlab.models.micro import pcm

    teacher = shipped["teacher"]
    student = copy.deepcopy(teacher)
    wrapped = LO.inject_lora(student, r=4)
    target = copy.deepcopy(student).eval()
    ab = T.alphas_cumprod()
    z, cond, uncond = shipped["z"], shipped["cond"], shipped["uncond"]
    g = torch.Generator().manual_seed(3)
    j, noise = torch.linspace(1, 49, len(z)).long(), torch.randn(z.shape, generator=g)
    disc = pcm.LatentDiscriminator(seed=0)
    opt = torch.optim.Adam(LO.lora_parameters(wrapped), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, pred, s = pcm.phased_consistency_loss(student, teacher, target, z, cond, uncond, j, 3.0, noise, ab)
        total = loss + 0.1 * (-disc(pred, s, cond).mean())
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    real = torch.randn(8, 4, 8, 8)
    d_loss = pcm.hinge_d_loss(disc(real, s[:8], cond[:8]), disc(pred[:8].detach(), s[:8], cond[:8]))
    assert torch.isfinite(d_loss) and d_loss.item() > 0


class _Conds:
    """The prompt conditions train_phased asks for, from fixed tensors (row i of z <-> row i of cond)."""

    def __init__(self, cond, uncond):
        self._c, self._u = cond, uncond

    def cond(self, idx, g=None):
        return self._c[idx]

    def uncond(self, cond):
        return self._u[:1].expand_as(cond)


class _CountingAdversary:
    """Records the pairs each discriminator update sees."""

    def __init__(self):
        self.seen = []

    def d_step(self, real, fake, s, cond):
        self.seen.append((real.clone(), fake.clone(), s.clone()))
        return 2.0

    def g_loss(self, fake, s, cond):
        return fake.sum() * 0


@pytest.mark.parametrize("adv_real", ["data", "target"])
def test_train_phased_runs_both_adversarial_pairs_and_refuses_others(shipped, adv_real):
    from trajlab.models.micro import pcm

    student = copy.deepcopy(shipped["teacher"])
    wrapped = LO.inject_lora(student, r=4)
    conds = _Conds(shipped["cond"], shipped["uncond"])
    res = pcm.train_phased(student, shipped["teacher"], shipped["z"], conds, 3, LO.lora_parameters(wrapped), batch=4,
                           adv_real=adv_real, seed=1, d_steps=2)
    assert len(res["d_loss"]) == 3 and all(0 < d < 4 for d in res["d_loss"])  # hinge pair: 2 at chance
    for d_pairs, same in (("same", True), ("fresh", False)):
        adv = _CountingAdversary()
        fresh = copy.deepcopy(shipped["teacher"])
        pcm.train_phased(fresh, shipped["teacher"], shipped["z"], conds, 2, LO.lora_parameters(LO.inject_lora(fresh, r=4)), batch=4,
                         adv_real=adv_real, seed=1, d_steps=3, d_pairs=d_pairs, adversary=adv)
        assert len(adv.seen) == 6  # 2 steps x 3 updates
        first, second = adv.seen[0], adv.seen[1]
        assert all(torch.equal(a, b) for a, b in zip(first, second)) == same
    with pytest.raises(ValueError, match="d_pairs='old'"):
        pcm.train_phased(student, shipped["teacher"], shipped["z"], conds, 1, LO.lora_parameters(wrapped), d_pairs="old")
    with pytest.raises(ValueError, match="adv_real='pixels'"):
        pcm.train_phased(student, shipped["teacher"], shipped["z"], conds, 1, LO.lora_parameters(wrapped), adv_real="pixels")
    with pytest.raises(ValueError, match="d_steps=0"):
        pcm.train_phased(student, shipped["teacher"], shipped["z"], conds, 1, LO.lora_parameters(wrapped), d_steps=0)


def test_tlcm_adapter_round_trip_and_data_free_latents(shipped, tmp_path):
    from trajlab.models.loading import load_peft_adapter, peft_adapter_files
    from trajlab.models.micro import tlcm

    z, labels = tlcm.generate_latents(shipped["sd"], n_per_digit=1, steps=2, guidance=T.DEFAULT_GUIDANCE, seed=0)
    assert z.shape == (10, 4, 8, 8) and labels.tolist() == list(range(10)) and torch.isfinite(z).all()
    unet = copy.deepcopy(shipped["teacher"])
    params = tlcm.add_peft_adapter(unet, r=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    tlcm.save_peft_adapter(unet, tmp_path)
    files = peft_adapter_files(str(tmp_path))
    assert files is not None, "the saved adapter must be recognised as a PEFT adapter"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(micro_paths()["micro-sd"]))
    load_peft_adapter(pipe, *files, adapter_name="t")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 259])
    cond = shipped["cond"][:2]
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=cond).sample
        got = pipe.unet(x, t, encoder_hidden_states=cond).sample
        base = shipped["teacher"](x, t, encoder_hidden_states=cond).sample
    assert (ref - base).abs().max() > 1e-3
    assert torch.allclose(got, ref, atol=2e-3), (got - ref).abs().max()  # fp16 on disk


def test_turbo_distillation_and_discriminator_losses_fall(shipped):
    from trajlab.models.micro import turbo

    teacher = shipped["teacher"]
    student = copy.deepcopy(teacher).requires_grad_(True)
    feats = turbo.FrozenFeatures(copy.deepcopy(teacher))
    disc = turbo.FeatureDiscriminator(seed=0)
    ab = T.alphas_cumprod()
    z, cond, uncond = shipped["z"], shipped["cond"], shipped["uncond"]
    g = torch.Generator().manual_seed(4)
    t = torch.tensor(turbo.STUDENT_TIMESTEPS).repeat(4)
    n1, n2, t2 = torch.randn(z.shape, generator=g), torch.randn(z.shape, generator=g), torch.randint(20, 981, (len(z),), generator=g)
    opt = torch.optim.Adam(student.parameters(), lr=1e-5)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    dist, dl = [], []
    for _ in range(6):
        x0 = turbo.add_student_x0(student, z, t, n1, cond, ab)
        d_loss = turbo.hinge_d_loss(disc(feats(z, cond), cond), disc([f.detach() for f in feats(x0.detach(), cond)], cond))
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        loss = turbo.distill_loss(teacher, x0, t2, n2, cond, uncond, 3.0, ab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dist.append(loss.item()), dl.append(d_loss.item())
    assert dist[-1] < dist[0], dist
    assert dl[-1] < dl[0], dl
    assert all(p.grad is None for p in feats.unet.parameters()), "the feature network must stay frozen"


def test_dmd_gradient_is_fake_minus_real_and_fake_score_learns(shipped):
    from trajlab.models.micro import dmd
    from trajlab.models.micro.distill import x0_from_eps
    from trajlab.models.micro.pcm import guided_eps

    teacher = shipped["teacher"]
    ab = T.alphas_cumprod()
    cond, uncond = shipped["cond"][:4], shipped["uncond"][:4]
    g = torch.Generator().manual_seed(5)
    x0_hat = shipped["z"][:4].clone().requires_grad_(True)
    t, noise = torch.tensor([100, 300, 600, 900]), torch.randn(4, 4, 8, 8, generator=g)
    # fake == teacher without CFG and real == teacher with w = 0: the DMD gradient vanishes
    loss0, gmag0 = dmd.dmd_loss(x0_hat, teacher, teacher, t, noise, cond, uncond, 0.0, ab)
    assert gmag0 < 1e-4 and loss0.item() < 1e-8
    loss, _ = dmd.dmd_loss(x0_hat, teacher, teacher, t, noise, cond, uncond, 3.0, ab)
    loss.backward()
    a = ab[t].view(-1, 1, 1, 1)
    x = a.sqrt() * x0_hat.detach() + (1 - a).sqrt() * noise
    with torch.no_grad():
        real = x0_from_eps(guided_eps(teacher, x, t, cond, uncond, 3.0), x, a)
        fake = x0_from_eps(teacher(x, t, encoder_hidden_states=cond).sample, x, a)
    norm = (x0_hat.detach() - real).abs().mean((1, 2, 3), keepdim=True)
    assert torch.allclose(x0_hat.grad, (fake - real) / norm / x0_hat.numel(), atol=1e-6)
    # the fake-score network's denoising loss falls on fixed generator samples
    fake_net = copy.deepcopy(teacher).requires_grad_(True)
    opt = torch.optim.Adam(fake_net.parameters(), lr=1e-4)
    samples = torch.randn(16, 4, 8, 8, generator=g) * 0.5  # off the data manifold: the teacher is wrong on them
    tf, nf = torch.randint(0, 1000, (16,), generator=g), torch.randn(16, 4, 8, 8, generator=g)
    cond16 = shipped["cond"]
    losses = []
    for _ in range(6):
        l = dmd.fake_score_loss(fake_net, samples, tf, nf, cond16, ab)
        opt.zero_grad()
        l.backward()
        opt.step()
        losses.append(l.item())
    assert losses[-1] < 0.9 * losses[0], losses
    # backward simulation: inputs at 999 are the noise itself, later ones are re-noised generator samples
    n1, n2 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_in = dmd.generator_inputs(teacher, n1, n2, torch.tensor([999, 499]), cond[:2], ab)
    assert torch.equal(x_in[0], n1[0]) and not torch.allclose(x_in[1], n1[1])
