"""PCM's adversarial consistency pair (``trajlab.models.micro.pcm.adversarial_pair``): what the discriminator compares,
at which timestep, with forward noise whose variance is checked against diffusers' own schedule."""

import pytest
import torch

from trajlab.models.micro import pcm


def _ab():
    """SD's scaled-linear alpha_bar from diffusers' DDPMScheduler (independent of the project's schedule code)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.float()


def test_project_schedule_is_sds():
    assert torch.allclose(pcm.alphas_cumprod().float(), _ab(), rtol=1e-5, atol=1e-7)


def test_data_pair_is_the_data_latent_noised_to_the_edge():
    ab, g = _ab(), torch.Generator().manual_seed(0)
    z0, pred, tgt = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    s = torch.tensor([0, 259, 499, 759, 0, 259])
    real, fake, t = pcm.adversarial_pair("data", pred, tgt, z0, s, ab, g)
    eps = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = ab[s].view(-1, 1, 1, 1)
    assert torch.equal(fake, pred) and torch.equal(t, s)
    assert torch.allclose(real, a.sqrt() * z0 + (1 - a).sqrt() * eps)


def test_target_pair_travels_both_into_the_phase_with_the_schedules_variance():
    ab, g = _ab(), torch.Generator().manual_seed(1)
    n = 4000
    s = torch.tensor([0, 259, 499, 759]).repeat(n // 4)
    z0 = torch.zeros(n, 4, 8, 8)
    real, fake, t = pcm.adversarial_pair("target", torch.zeros(n, 4, 8, 8), torch.zeros(n, 4, 8, 8), z0, s, ab, g)
    upper = {0: 259, 259: 499, 499: 759, 759: 1000}
    assert all(int(si) <= int(ti) < upper[int(si)] for si, ti in zip(s, t))
    assert all(len(set(t[s == e].tolist())) > 50 for e in upper)  # spread over the phase, not one timestep
    var = 1 - ab[t] / ab[s]  # forward noise from s to t on a zero latent
    for x in (real, fake):
        got = x.pow(2).mean((1, 2, 3))
        assert torch.allclose(got.mean(), var.mean(), rtol=0.03)
        assert torch.corrcoef(torch.stack([got, var]))[0, 1] > 0.9
    assert not torch.equal(real, fake)  # fresh noise each


def test_target_pair_keeps_both_latents_where_the_timestep_is_the_edge():
    ab = _ab()
    s = torch.zeros(2048, dtype=torch.long)  # t = s for about 1 in 259
    tgt, pred = torch.randn(2048, 4, 8, 8), torch.randn(2048, 4, 8, 8)
    real, fake, t = pcm.adversarial_pair("target", pred, tgt, None, s, ab, torch.Generator().manual_seed(2))
    at_edge = t == 0
    assert at_edge.any()
    assert torch.equal(real[at_edge], tgt[at_edge]) and torch.equal(fake[at_edge], pred[at_edge])
    assert not torch.allclose(real[~at_edge], tgt[~at_edge])


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind='pixels'"):
        pcm.adversarial_pair("pixels", None, None, None, torch.zeros(1, dtype=torch.long), _ab(), torch.Generator())
