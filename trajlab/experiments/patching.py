"""Teacher-student patching: run a receiver (a student, or the teacher) with the outputs of chosen modules, or
its latent, replaced by a donor's at chosen steps, matched by prompt and seed; sweep (site, step) and measure
how much diversity and prompt accuracy each patch restores (``trajlab experiment patching``, the demo).

Runs. Every run of a sweep starts from the same seeds (``torch.Generator().manual_seed(seed)`` per sample, as
capture seeds them: the same initial noise, and the same step noise for stochastic samplers), on the same
prompts, in the same batches. The donor runs once on its own grid (its scheduler, steps, guidance) with forward
hooks that record the chosen modules' outputs at the donor steps the receiver's steps are matched to; the
receiver then runs on its own grid with forward hooks that return the donor's recorded output instead of its
own at the patched (site, step) cells. Nothing is patched: the plain receiver, bitwise (no hook fires).

Step matching (two models on different timestep grids). Receiver step i starts at timestep t_i, noise level
sigma_i = sqrt((1 - abar(t_i)) / abar(t_i)) (EDM sigma of the shared alphas_cumprod); it is matched to the donor
step j(i) whose starting sigma is nearest on a log scale, ties to the earlier (noisier) donor step
(:func:`match_steps`). A module patch at receiver step i puts in the donor's output at donor step j(i): what the
donor computed at the nearest noise level on its own trajectory from the same seed and prompt.

The latent (site ``"latent"``) at receiver step i is the teacher-first-k hybrid with k = j(i):
:class:`trajlab.models.hybrid.HybridPipeline` runs the donor's first j(i) steps, hands its state x at
tau = t_j(i) to the receiver, which is told tau and finishes its own grid below it
(:func:`trajlab.models.hybrid.handoff_grid`); k = 0 (step 0 of any receiver: the seed's noise) is the
unpatched receiver. That needs a receiver scheduler that takes custom timesteps on the variance-preserving
latent scale (LCM). Any other receiver (Euler ancestral: Turbo; DDIM: the teacher) keeps its own grid: its
latent entering step i is replaced by the donor's entering step j(i), converted to the receiver's scale (an
Euler-type latent x0 + sigma eps gets the donor's state as x0 + sigma_j eps: its content and noise level kept,
entered at the receiver's sigma_i, which the matching makes the nearest); its step noise stays its own. Which
way each receiver took: ``latent_method`` in the map.

Classifier-free guidance. A CFG model evaluates a doubled batch [unconditional; conditional]. A donor with CFG
patched into a receiver without it gives each module output as the guided combination u + w (c - u) (w: the
donor's guidance; for the UNet's output this is exactly the donor's guided prediction; ``cfg="cond"``: the
conditional half only); a receiver with CFG gets the donor's halves as they are, or a donor without CFG its
output in both halves.

Known answers (tests/test_patching.py): patching nothing reproduces the receiver bitwise; every module at every
step with the receiver's own outputs reproduces it; on a shared grid and scheduler, the donor's output module at
every step reproduces the donor's output exactly; the latent at step 0 is the unpatched receiver.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LATENT = "latent"
DEMO_DONOR = "micro-sd"
DEMO_RECEIVERS = ("micro-turbo", "micro-dmd")
DEMO_SITES = ("down_blocks.1", "mid_block", "up_blocks.1", LATENT)
"""The demo's sites: the cross-attention down block (with its skips), the bottleneck, the last decoder block
(only the output norm and conv after it), and the latent (the hybrid)."""
CFG_MODES = ("guided", "cond")


@dataclass
class Side:
    """One model of a patching run: registry name (or any label), scheduler short name (``trajlab models``),
    steps, guidance, and its loaded pipeline (its ``scheduler`` the named one)."""

    model: str
    scheduler: str
    steps: int
    guidance: float
    pipe: object = field(default=None, repr=False)

    @property
    def cfg(self) -> bool:
        """True when the model runs a doubled (unconditional, conditional) batch."""
        proj = getattr(self.pipe.unet.config, "time_cond_proj_dim", None)
        return self.guidance > 1 and proj is None and hasattr(self.pipe, "encode_prompt")

    def label(self) -> str:
        return f"{self.model} {self.scheduler} {self.steps} steps cfg {self.guidance:g}"


def load_side(model: str, *, scheduler: str | None = None, steps: int | None = None, guidance: float | None = None,
              device: str = "cpu") -> Side:
    """A :class:`Side` at the registry's recommendation unless given."""
    from trajlab.models.loading import load_pipeline
    from trajlab.models.registry import get

    spec = get(model)
    scheduler = scheduler or spec.scheduler
    pipe = load_pipeline(model, scheduler=scheduler, device=device)
    return Side(model, scheduler, int(steps or spec.steps), float(spec.guidance if guidance is None else guidance),
                pipe)


# -- grids ----------------------------------------------------------------------------------------
def step_grid(side: Side) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, EDM sigma at each step's start) of ``side``'s grid (a copy of its scheduler)."""
    s = copy.deepcopy(side.pipe.scheduler)
    s.set_timesteps(side.steps)
    t = np.asarray(s.timesteps, dtype=np.float64)
    abar = np.asarray(s.alphas_cumprod, dtype=np.float64)
    a = np.interp(t, np.arange(abar.size), abar)
    return t, np.sqrt((1 - a) / a)


def match_steps(receiver_sigma, donor_sigma) -> np.ndarray:
    """Donor step j(i) for every receiver step i: nearest starting sigma on a log scale, ties to the earlier
    (noisier) donor step."""
    d = np.abs(np.log(np.asarray(donor_sigma, dtype=np.float64))[None, :]
               - np.log(np.asarray(receiver_sigma, dtype=np.float64))[:, None])
    return (d <= d.min(axis=1, keepdims=True) + 1e-9).argmax(axis=1)  # first (noisiest) within round-off of the min


def check_sites(unet, sites) -> None:
    """ValueError naming the nearest module names for a site that is not a module of ``unet`` (or "latent")."""
    names = [n for n, _ in unet.named_modules() if n]
    for s in sites:
        if s != LATENT and s not in names:
            near = difflib.get_close_matches(s, names, n=5, cutoff=0.3)
            raise ValueError(f"patching site {s!r} is not a module of {type(unet).__name__}; nearest: {near} "
                             "(or 'latent')")


def latent_applicable(side: Side) -> str:
    """Why the latent cannot be handed to this receiver by the hybrid (the receiver told the donor's timestep), or
    "" when it can; where it cannot, the latent patch is made on the receiver's own grid (:func:`latent_method`)."""
    s = side.pipe.scheduler
    if "timesteps" not in inspect.signature(type(s).set_timesteps).parameters:
        return f"{type(s).__name__} takes no custom timesteps"
    if _scaled(side):
        return f"{type(s).__name__} samples on a scaled latent (init_noise_sigma {float(_init_sigma(side)):.3g})"
    return ""


def latent_method(side: Side) -> str:
    """How a latent patch enters this receiver: "hybrid" (the hand-off, the receiver told the donor's timestep) or
    "own grid" (the receiver keeps its grid; its state at step i is replaced by the donor's at j(i))."""
    return "own grid" if latent_applicable(side) else "hybrid"


def _init_sigma(side: Side) -> float:
    c = copy.deepcopy(side.pipe.scheduler)
    c.set_timesteps(side.steps)
    return float(c.init_noise_sigma)


def _scaled(side: Side) -> bool:
    """Whether the side's scheduler keeps its latent as x0 + sigma eps (Euler-type) rather than on the
    variance-preserving scale sqrt(abar) x0 + sqrt(1 - abar) eps."""
    return abs(_init_sigma(side) - 1.0) > 1e-6


def _vp_factor(side: Side, step: int) -> float:
    """latent_vp = factor * the side's latent at the start of ``step``: sqrt(abar(t)) = 1 / sqrt(1 + sigma^2) for
    a scaled latent, 1 on the VP scale."""
    if not _scaled(side):
        return 1.0
    return float(1.0 / np.sqrt(1.0 + step_grid(side)[1][step] ** 2))


# -- one run --------------------------------------------------------------------------------------
def _tree(fn, value):
    import torch

    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_tree(fn, v) for v in value)
    raise TypeError(f"a module output of type {type(value).__name__}: patching handles tensors and tuples of them")


def _convert(value, donor: Side, receiver: Side, mode: str):
    """The donor's recorded output in the receiver's batch layout (module docstring, CFG)."""
    import torch

    def conv(t):
        if donor.cfg and not receiver.cfg:
            u, c = t.chunk(2)
            return c if mode == "cond" else u + donor.guidance * (c - u)
        if receiver.cfg and not donor.cfg:
            return torch.cat([t, t])
        return t
    return _tree(conv, value)


def _same_shapes(new, old, site):
    def shape(v):
        return _tree(lambda t: tuple(t.shape), v)
    if shape(new) != shape(old):
        raise ValueError(f"patching site {site!r}: the donor's output {shape(new)} does not fit the receiver's "
                         f"{shape(old)} (different architectures?)")


def run_side(side: Side, prompts, seeds, *, record=None, patch=None, device: str = "cpu"):
    """Final latents of ``side`` on (prompts[i], seeds[i]); its own grid, noise seeded per sample.

    record: {site: set of steps}: returns also {(site, step): [the module's output at each of its calls in that
    step's network evaluation]} (detached clones; a module may run more than once per evaluation, e.g. a
    resnet's activation on the features and on the time embedding).
    patch: {(site, step): callable(output, call index) -> replacement}. Returns (final latents, records)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from trajlab.models.denoiser import encode, guided_model, sample
    from trajlab.models.schedulers import step_kwargs

    pipe, unet = side.pipe, side.pipe.unet
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(side.steps, device=device)
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    size = unet.config.sample_size
    cond = encode(pipe, list(prompts), guidance_scale=side.guidance, device=device, latent_dtype=unet.dtype)
    latents = randn_tensor((len(seeds), unet.config.in_channels, size, size), generator=gens,
                           device=torch.device(device),
                           dtype=unet.dtype) * sched.init_noise_sigma
    state, out, handles = {"step": -1, "calls": {}}, {}, []
    modules = dict(unet.named_modules())

    def count(module, args):
        state["step"] += 1
        state["calls"] = {}

    def hook_for(site):
        def hook(module, args, output):
            key = (site, state["step"])
            call = state["calls"][site] = state["calls"].get(site, -1) + 1
            if record and state["step"] in record.get(site, ()):
                out.setdefault(key, []).append(_tree(lambda t: t.detach().clone(), output))
            if patch and key in patch:
                new = patch[key](output, call)
                _same_shapes(new, output, site)
                return _tree(lambda t: t.to(dtype=output_dtype(output)), new)
            return None
        return hook

    def output_dtype(o):
        return o.dtype if isinstance(o, torch.Tensor) else output_dtype(o[0])

    sites = (set(record or ()) | {s for s, _ in (patch or {})}) - {LATENT}

    def at_start(step, latent):  # the latent entering ``step``: recorded, or replaced by a patch
        key = (LATENT, step)
        if record and step in record.get(LATENT, ()):
            out[key] = [latent.detach().clone()]
        if patch and key in patch:
            new = patch[key](latent, 0)
            _same_shapes(new, latent, LATENT)
            return new.to(dtype=latent.dtype)
        return latent

    try:
        handles.append(unet.register_forward_pre_hook(count))
        handles += [modules[s].register_forward_hook(hook_for(s)) for s in sorted(sites)]
        with torch.no_grad():
            latents = at_start(0, latents)
            final = sample(sched, guided_model(unet, cond), latents, extra_step_kwargs=step_kwargs(sched, gens),
                           callback=lambda i, t, x: at_start(i + 1, x))
    finally:
        for h in handles:
            h.remove()
    return final, out


def run_latent_patch(donor: Side, receiver: Side, k: int, prompts, seeds, *, device: str = "cpu"):
    """Final latents of the hybrid: the donor's first k steps, then the receiver told the hand-off timestep
    (:class:`trajlab.models.hybrid.HybridPipeline`, the demo's and the experiments' hybrid)."""
    import torch

    from trajlab.models.hybrid import HybridPipeline, HybridSpec, hybrid_extra
    from trajlab.models.schedulers import make_scheduler

    hp = HybridPipeline(donor.pipe, receiver.pipe, "pipelines")
    spec = HybridSpec(teacher=donor.model, student=receiver.model, handoff_step=int(k), teacher_steps=donor.steps,
                      student_steps=receiver.steps, teacher_guidance=donor.guidance,
                      student_guidance=receiver.guidance, teacher_scheduler=donor.scheduler,
                      student_scheduler=receiver.scheduler, mechanism="pipelines")
    hp.configure(hybrid_extra(spec, make_scheduler(donor.scheduler, hp.teacher_base),
                              make_scheduler(receiver.scheduler, hp.student_base)))
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    return hp(list(prompts), generator=gens, output_type="latent").images


def patched_run(receiver: Side, donor: Side, donor_record: dict, patches, match, prompts, seeds, *,
                cfg: str = "guided", device: str = "cpu"):
    """Final latents of ``receiver`` with ``patches`` [(site, receiver step)] applied: module sites take the
    donor's output recorded at donor step ``match[step]`` (``donor_record[(site, donor step)]`` on these very
    samples); one ``("latent", i)`` patch runs the hybrid with k = match[i] (no module patch beside it)."""
    if cfg not in CFG_MODES:
        raise ValueError(f"cfg={cfg!r}; expected one of {CFG_MODES}")
    patches = list(patches)
    lat = [p for p in patches if p[0] == LATENT]
    if lat:
        if len(patches) != 1:
            raise ValueError("a latent patch runs alone (the hybrid hand-off); got " + repr(patches))
        i = int(lat[0][1])
        if latent_method(receiver) == "hybrid":
            return run_latent_patch(donor, receiver, int(match[i]), prompts, seeds, device=device)
        if i == 0:  # the seed's noise, the same for both
            return run_side(receiver, prompts, seeds, device=device)[0]
        j = int(match[i])
        if (LATENT, j) not in donor_record:
            raise ValueError(f"latent patch of {receiver.model} at step {i}: the donor's latent at its step {j} was not "
                             "recorded (run_side(record={'latent': ...}))")
        # the donor's state on the VP scale, then on the receiver's: x0 + sigma_j eps for a scaled receiver (the
        # donor's content and noise level kept), as it is for a VP one
        scale = _vp_factor(donor, j) * (float(np.sqrt(1.0 + step_grid(donor)[1][j] ** 2)) if _scaled(receiver) else 1.0)
        x = donor_record[(LATENT, j)][0]
        return run_side(receiver, prompts, seeds, patch={(LATENT, i): lambda _x, _c: x * scale}, device=device)[0]
    check_sites(receiver.pipe.unet, {s for s, _ in patches})
    def replace(site, j):
        calls = donor_record[(site, j)]

        def fn(output, call):
            if call >= len(calls):
                raise ValueError(f"patching site {site!r}: the receiver calls it more often per evaluation than the "
                                 f"donor ({len(calls)})")
            return _convert(calls[call], donor, receiver, cfg)
        return fn

    table = {(s, i): replace(s, int(match[i])) for s, i in patches}
    return run_side(receiver, prompts, seeds, patch=table, device=device)[0]


def decode_images(side: Side, latents) -> np.ndarray:
    """uint8 (N, H, W, 3) images of final latents with ``side``'s VAE, as capture stores them."""
    import torch

    from trajlab.capture.run import to_uint8
    from trajlab.models.hybrid import _decode

    with torch.no_grad():
        return to_uint8(_decode(side.pipe, latents, None, "np"))


__all__ = ["CFG_MODES", "DEMO_DONOR", "DEMO_RECEIVERS", "DEMO_SITES", "LATENT", "Side", "check_sites",
           "decode_images", "latent_applicable", "latent_method", "load_side", "match_steps", "patched_run", "run_latent_patch",
           "run_side", "step_grid"]


# -- the sweep ------------------------------------------------------------------------------------
def _batches(n: int, size: int):
    return [np.arange(i, min(n, i + size)) for i in range(0, n, size)]


def _images_da(images: np.ndarray, prompts, seeds):
    import xarray as xr

    P, S = len(prompts), len(seeds)
    return xr.DataArray(images.reshape(P, S, *images.shape[1:]), dims=("prompt", "seed", "y", "x", "rgb"),
                        coords={"prompt": list(prompts), "seed": list(seeds)})


def _donor_pass(donor, record, texts, seeds_flat, batches, device):
    """(donor images, [per-batch records]) of one donor pass."""
    import torch

    finals, recs = [], []
    for b in batches:
        f, r = run_side(donor, texts[b], seeds_flat[b], record=record, device=device)
        finals.append(f)
        recs.append(r)
    return decode_images(donor, torch.cat(finals)), recs


def _receiver_cells(donor, receiver, sites, steps, match, recs, texts, seeds_flat, batches, n_steps, *,
                    cfg, device, say):
    """(baseline images, images (site, step, N, H, W, 3), applicable, why) of one receiver; steps past its own
    (the padded step axis) and inapplicable latent cells are left out with the reason."""
    import torch

    base = decode_images(receiver, torch.cat([run_side(receiver, texts[b], seeds_flat[b], device=device)[0]
                                              for b in batches]))
    images = np.zeros((len(sites), n_steps, *base.shape), dtype=np.uint8)
    ok = np.zeros((len(sites), n_steps), dtype=bool)
    why = np.full((len(sites), n_steps), "", dtype=object)
    for a, site in enumerate(sites):
        for i in range(n_steps):
            if i not in steps:
                why[a, i] = (f"{receiver.model} runs {receiver.steps} steps" if i >= receiver.steps
                             else "step not in the sweep")
                continue
            t = time.perf_counter()
            lat = torch.cat([patched_run(receiver, donor, recs[k], [(site, i)], match, texts[b], seeds_flat[b],
                                         cfg=cfg, device=device) for k, b in enumerate(batches)])
            images[a, i], ok[a, i] = decode_images(receiver, lat), True
            say(f"  {receiver.model}: {site} at step {i} (donor step {int(match[i])}) {time.perf_counter() - t:.1f} s")
    return base, images, ok, why


def patching_sweep(donor: Side, receivers, prompts, seeds, *, sites=DEMO_SITES, steps=None, batch_size: int = 32,
                   cfg: str = "guided", device: str = "cpu", diversity=None, labeller=None, population=None,
                   progress=print):
    """The patching map of every receiver against ``donor`` (dims receiver, site, step; the step axis padded to
    the longest receiver grid), one cell per (site, receiver step) patched alone.

    steps: receiver step indices to patch (default: all of each grid). diversity: (pairwise(uint8 images) ->
    (n, n), name) (default: micro-LPIPS when the labeller weights are shipped, else the pixel substitute, as the
    verdicts choose); labeller: uint8 images -> (labels, probs) for prompted-digit accuracy (None: not measured).
    population: the world's whole prompt set when ``prompts`` are exactly it (see the verdict engine).
    Statistics: :func:`trajlab.analysis.patching.patching_map`."""
    import xarray as xr

    from trajlab.analysis.patching import FAMILY_LEVEL, patching_map

    say = progress or (lambda *_: None)
    t0 = time.perf_counter()
    sites = list(sites)
    modules = [s for s in sites if s != LATENT]
    check_sites(donor.pipe.unet, modules)
    pairwise, metric = diversity if diversity is not None else default_diversity()
    texts = np.array([p for p in prompts for _ in seeds], dtype=object)
    seeds_flat = np.array([s for _ in prompts for s in seeds])
    batches = _batches(len(texts), batch_size)
    d_t, d_sigma = step_grid(donor)
    grids = {}
    for r in receivers:
        check_sites(r.pipe.unet, modules)
        t, sg = step_grid(r)
        grids[r.model] = (t, sg, match_steps(sg, d_sigma), sorted(set(range(r.steps) if steps is None else steps)))
    own_grid = LATENT in sites and any(latent_method(r) == "own grid" for r in receivers)
    record = {s: {int(g[2][i]) for g in grids.values() for i in g[3] if i < len(g[2])}
              for s in modules + ([LATENT] if own_grid else [])}
    donor_images, recs = _donor_pass(donor, record, texts, seeds_flat, batches, device)
    say(f"patching: donor {donor.label()} recorded {modules} at its steps "
        f"{sorted(set().union(*record.values())) if record else []} ({time.perf_counter() - t0:.0f} s)")
    n_steps = max(r.steps for r in receivers)
    maps = []
    for r in receivers:
        t, sg, match, rsteps = grids[r.model]
        base, images, ok, why = _receiver_cells(donor, r, sites, rsteps, match, recs, texts, seeds_flat, batches,
                                                n_steps, cfg=cfg, device=device, say=say)
        cells = xr.Dataset({"images": (("site", "step", "prompt", "seed", "y", "x", "rgb"),
                                       images.reshape(len(sites), n_steps, len(prompts), len(seeds), *base.shape[1:])),
                            "applicable": (("site", "step"), ok), "why": (("site", "step"), why.astype(str))},
                           coords={"site": sites, "step": np.arange(n_steps), "prompt": list(prompts),
                                   "seed": list(seeds)})
        m = patching_map(cells, _images_da(base, prompts, seeds), _images_da(donor_images, prompts, seeds),
                         pairwise=pairwise, metric=metric, labeller=labeller, population=population)
        maps.append(_receiver_vars(m, r, t, sg, match, d_t, d_sigma, n_steps, latent_method(r)))
        say(f"patching: {r.label()} done ({time.perf_counter() - t0:.0f} s)")
    ds = xr.concat(maps, dim="receiver", combine_attrs="drop").assign_coords(receiver=[r.model for r in receivers])
    ds.attrs.update(donor=donor.model, donor_label=donor.label(), metric=metric, cfg=cfg, n_prompts=len(prompts),
                    n_seeds=len(seeds), seconds=round(time.perf_counter() - t0, 1), matching=MATCHING,
                    interval=maps[0].attrs.get("interval", ""), prompts_as=maps[0].attrs.get("prompts_as", ""),
                    simultaneous=f"Bonferroni over each receiver's n_cells applicable cells (family-wise "
                                 f"{FAMILY_LEVEL:.0%}): div_raises / acc_lowers where that interval clears 0")
    return ds


MATCHING = ("receiver step i (starting sigma_i) <- donor step j(i) with the nearest starting sigma on a log scale, "
            "ties to the noisier; latent at step i = the hybrid with k = j(i) (the receiver told the donor's "
            "timestep) where the receiver's scheduler takes custom timesteps on the VP scale (LCM), else on the "
            "receiver's own grid: its state entering step i replaced by the donor's entering j(i) (as x0 + sigma eps "
            "for Euler-type receivers)")


def _receiver_vars(m, r: Side, t, sigma, match, d_t, d_sigma, n_steps, latent: str = ""):
    """``m`` (site, step) with the receiver's grid, the matched donor steps and its per-receiver scalars as
    variables (padded to ``n_steps``); ``latent``: how its latent cells were patched (:func:`latent_method`)."""
    pad = n_steps - len(t)

    def padded(a, fill=np.nan):
        return np.concatenate([np.asarray(a, dtype=float), np.full(pad, fill)])

    m = m.assign(receiver_timestep=("step", padded(t)), receiver_sigma=("step", padded(sigma)),
                 latent_method=latent,
                 donor_step=("step", padded(match, -1)), donor_timestep=("step", padded(d_t[match])),
                 donor_sigma=("step", padded(d_sigma[match])), receiver_label=r.label(), receiver_steps=r.steps)
    for k in ("receiver_diversity", "donor_diversity", "collapse", "collapse_ci_low", "collapse_ci_high",
              "receiver_accuracy", "donor_accuracy", "accuracy_gap", "accuracy_gap_ci_low", "accuracy_gap_ci_high"):
        m[k] = float(m.attrs.get(k, np.nan))
    m["n_cells"] = int(m.attrs.get("n_cells", 0))  # the Bonferroni family of this receiver's *_sim_ci
    m["receiver_sigma"].attrs["units"] = "EDM sigma at the step's start"
    m["collapse"].attrs["units"] = m.attrs.get("collapse_meaning", "")
    return m


def default_diversity():
    """(pairwise, name): micro-LPIPS when the labeller weights are shipped, else the pixel substitute."""
    from trajlab.verdicts.matching import PIXEL_DIVERSITY, pixel_pairwise

    try:
        from trajlab.metrics import world_lpips as W

        model = W.load_micro_lpips()
        return (lambda images: W.micro_lpips_pairwise(model, images)), f"mean pairwise {W.DESCRIPTION} within prompt"
    except FileNotFoundError:
        return pixel_pairwise, PIXEL_DIVERSITY


def run_patching(out_dir, *, quick: bool = False, n_prompts: int | None = None, seeds=None, donor: str = DEMO_DONOR,
                 receivers=DEMO_RECEIVERS, sites=DEMO_SITES, device: str = "cpu", batch_size: int = 32,
                 progress=print) -> Path:
    """The micro-world patching map (what ``trajlab experiment patching`` and the demo run): ``donor`` into each
    of ``receivers`` at their registry configurations, on the first ``n_prompts`` digit prompts (default 10;
    quick 4) x ``seeds`` (default 0:16; quick 0:8); diversity micro-LPIPS, accuracy by the micro labeller.
    Writes ``out_dir/<donor>_patching.nc`` (the map) and ``<donor>_patching.png`` (its figure); returns the
    NetCDF path."""
    from trajlab.analysis.io import save_dataset, save_figure
    from trajlab.models.micro import PROMPTS, load_labeller
    from trajlab.plots.patching import plot_patching_map

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = list(PROMPTS[: n_prompts or (4 if quick else 10)])
    seeds = list(seeds if seeds is not None else range(8 if quick else 16))
    d = load_side(donor, device=device)
    rs = [load_side(r, device=device) for r in receivers]
    try:
        labeller = load_labeller()
    except FileNotFoundError:
        labeller = None
    ds = patching_sweep(d, rs, prompts, seeds, sites=sites, batch_size=batch_size, device=device,
                        labeller=labeller, population=PROMPTS if set(prompts) == set(PROMPTS) else None,
                        progress=progress)
    path = save_dataset(ds, out / f"{donor}_patching.nc", attrs={"group": f"{donor} patching"})
    save_figure(plot_patching_map(ds), out / f"{donor}_patching.png")
    if progress:
        progress(f"patching map: {path} ({ds.attrs['seconds']:.0f} s)")
    return path


LISTING = "the teacher's module outputs / latent patched into the collapsing students: a map with CIs (no store)"
"""``trajlab experiment --list``'s line for the patching experiment."""


def cli_patching(args) -> int:
    """``trajlab experiment patching --out DIR [--quick] [--seeds S] [--receiver M ...] [--site NAME ...]``:
    validates (before any model loads), runs :func:`run_patching` into DIR, prints where the map is."""
    from trajlab.experiments.plans import InputError, parse_seeds
    from trajlab.models.registry import get

    if getattr(args, "map", None) or getattr(args, "shard", None):
        raise InputError("experiment patching: --map and --shard do not apply (it runs the micro-world donor and "
                         "receivers itself, in one process)")
    seeds = parse_seeds(args.seeds) if args.seeds else None
    if seeds is not None and len(seeds) < 3:
        raise InputError(f"experiment patching: --seeds gives {len(seeds)} seed(s); the intervals need >= 3")
    receivers = tuple(args.receiver or DEMO_RECEIVERS)
    for m in (DEMO_DONOR, *receivers):
        if get(m) is None:
            raise InputError(f"experiment patching: unknown model {m!r} (see `trajlab models`)")
    sites = tuple(args.site or DEMO_SITES)
    path = run_patching(args.out, quick=args.quick, seeds=seeds, receivers=receivers, sites=sites,
                        device=args.device or "cpu", progress=None if args.quiet else print)
    print(f"experiment patching: {path} and {path.with_suffix('.png')} (trajlab report --analyses "
          f"{Path(args.out)} shows it)")
    return 0
