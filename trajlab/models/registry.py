"""Named models for every system the research plan studies, with their recommended settings.

Real entries carry hub ids (never downloaded here: the loader looks in the local Hugging Face
cache and fails fast if they are absent). Built-in entries (``tiny-*``, ``micro-*``, ``exact:*``)
are built or shipped by the project and work offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


@dataclass(frozen=True)
class Lora:
    """A LoRA: hub id or local path, optional subfolder / weight file, and its scale."""

    source: str
    scale: float = 1.0
    weight_name: str | None = None
    subfolder: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model and how the literature samples it.

    ``source`` is a hub id or a local folder (``builtin:NAME`` for models built in code);
    ``unet`` optionally replaces the base UNet (e.g. LCM-SDXL ships only a UNet).
    """

    name: str
    source: str
    pipeline: str
    scheduler: str
    steps: int
    guidance: float
    loras: tuple[Lora, ...] = ()
    unet: str | None = None
    role: str = "teacher"
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _pcm(base: str, arch: str, k: int) -> ModelSpec:
    return ModelSpec(
        name=f"pcm-{arch}-{k}step", source=base,
        pipeline="StableDiffusionPipeline" if arch == "sd15" else "StableDiffusionXLPipeline",
        scheduler="tcd-trailing", steps=k, guidance=1.0, role="student",
        loras=(Lora("wangfuyun/PCM_Weights", subfolder=arch, weight_name=f"pcm_{arch}_smallcfg_{k}step_converted.safetensors"),),
        notes="Phased Consistency Model LoRA (Wang et al. 2024); TCD trailing or DDIM trailing; small-CFG variant",
    )


REAL_MODELS = [
    ModelSpec("sd15", SD15, "StableDiffusionPipeline", "ddim", 30, 7.5, notes="SD1.5 teacher"),
    ModelSpec("sdxl", SDXL, "StableDiffusionXLPipeline", "euler", 30, 5.0, notes="SDXL base teacher"),
    ModelSpec("lcm-lora-sd15", SD15, "StableDiffusionPipeline", "lcm", 4, 1.0, role="student",
              loras=(Lora("latent-consistency/lcm-lora-sdv1-5"),), notes="LCM-LoRA on SD1.5 (Luo et al. 2023b)"),
    ModelSpec("lcm-lora-sdxl", SDXL, "StableDiffusionXLPipeline", "lcm", 4, 1.0, role="student",
              loras=(Lora("latent-consistency/lcm-lora-sdxl"),), notes="LCM-LoRA on SDXL"),
    ModelSpec("lcm-dreamshaper-v7", "SimianLuo/LCM_Dreamshaper_v7", "LatentConsistencyModelPipeline", "lcm", 4, 8.0,
              role="student", notes="full LCM distilled from Dreamshaper v7 (w-embedding: CFG by construction)"),
    ModelSpec("lcm-sdxl", SDXL, "StableDiffusionXLPipeline", "lcm", 4, 8.0, unet="latent-consistency/lcm-sdxl",
              role="student", notes="full LCM UNet on SDXL base"),
    *[_pcm(SD15, "sd15", k) for k in (2, 4, 8, 16)],
    *[_pcm(SDXL, "sdxl", k) for k in (2, 4, 8, 16)],
    ModelSpec("tlcm-sdxl", SDXL, "StableDiffusionXLPipeline", "lcm", 4, 0.0, role="student",
              loras=(Lora("OPPOer/TLCM", weight_name="TLCM_SDXL.safetensors"),),
              notes="TLCM (Xie et al. 2024) LoRA on SDXL, LCMScheduler, CFG 0. Its README loads the LoRA as a PEFT "
                    "adapter (r=64, unet.load_adapter); the file name in OPPOer/TLCM is unverified offline: pass "
                    "--lora PATH for the file you downloaded"),
    ModelSpec("sdxl-turbo", "stabilityai/sdxl-turbo", "StableDiffusionXLPipeline", "euler-ancestral", 1, 0.0,
              role="student", notes="adversarial diffusion distillation; 1 step, CFG 0 (its scheduler is trailing)"),
    ModelSpec("dmd2-sdxl-lora", SDXL, "StableDiffusionXLPipeline", "lcm", 4, 0.0, role="student",
              loras=(Lora("tianweiy/DMD2", weight_name="dmd2_sdxl_4step_lora_fp16.safetensors"),),
              notes="DMD2 (Yin et al. 2024) 4-step LoRA on SDXL, LCMScheduler, CFG 0 (its README fuses the LoRA and "
                    "passes timesteps [999, 749, 499, 249]; LCMScheduler's own 4-step grid is [999, 759, 499, 259])"),
]

SEED_SYSTEMS = {
    "sd15": "micro-sd", "sdxl": "micro-sd", "lcm-lora-sd15": "micro-lcm-lora", "lcm-lora-sdxl": "micro-lcm-lora",
    "lcm-dreamshaper-v7": "micro-lcm", "lcm-sdxl": "micro-lcm",
    **{f"pcm-{arch}-{k}step": "micro-pcm" for arch in ("sd15", "sdxl") for k in (2, 4, 8, 16)},
    "tlcm-sdxl": "micro-tlcm", "sdxl-turbo": "micro-turbo", "dmd2-sdxl-lora": "micro-dmd",
}
"""Each real system of the research plan -> its offline analogue in the micro-world (same recipe in miniature,
loaded the same way: a LoRA where the real one is a LoRA, a UNet swap where it is one)."""

_SHAPES = "world:shapes/shapes-sd"
SHAPES_STUDENTS = [
    ModelSpec("shapes-lcm", _SHAPES, "StableDiffusionPipeline", "lcm", 4, 4.0, unet="world:shapes/shapes-lcm", role="student",
              notes="shapes-world LCM (full UNet with w-embedding, swapped into shapes-sd as lcm-sdxl into SDXL)"),
    ModelSpec("shapes-lcm-lora", _SHAPES, "StableDiffusionPipeline", "lcm", 4, 1.0, role="student",
              loras=(Lora("world:shapes/shapes-lcm-lora"),), notes="shapes-world LCM-LoRA (PEFT, diffusers LoRA file) on shapes-sd"),
    ModelSpec("shapes-pcm", _SHAPES, "StableDiffusionPipeline", "tcd-trailing", 4, 1.0, role="student",
              loras=(Lora("world:shapes/shapes-pcm"),), notes="shapes-world PCM LoRA (4 phases, adversarial consistency loss)"),
    ModelSpec("shapes-tlcm", _SHAPES, "StableDiffusionPipeline", "tcd-trailing", 4, 1.0, role="student",
              loras=(Lora("world:shapes/shapes-tlcm"),), notes="shapes-world TLCM: data-free multistep LCD, PEFT adapter"),
    ModelSpec("shapes-turbo", _SHAPES, "StableDiffusionPipeline", "euler-ancestral-trailing", 1, 0.0, unet="world:shapes/shapes-turbo",
              role="student", notes="shapes-world ADD student at ADD's weighting (adversarial 1 : distillation 2.5); 1-4 steps, guidance 0"),
    ModelSpec("shapes-turbo-distill-heavy", _SHAPES, "StableDiffusionPipeline", "euler-ancestral-trailing", 1, 0.0,
              unet="world:shapes/shapes-turbo-distill-heavy", role="student",
              notes="ablation: ADD at adversarial 0.05 : distillation 2.5 (regression-heavy)"),
    ModelSpec("shapes-dmd2", _SHAPES, "StableDiffusionPipeline", "lcm", 4, 1.0, unet="world:shapes/shapes-dmd2", role="student",
              notes="shapes-world DMD2 generator (GAN term, 5 fake-score updates per step), UNet swapped into shapes-sd"),
    ModelSpec("shapes-dmd2-no-gan", _SHAPES, "StableDiffusionPipeline", "lcm", 4, 1.0, unet="world:shapes/shapes-dmd2-no-gan",
              role="student", notes="ablation: DMD2 without its GAN term"),
]
"""The shapes world's students (``trajlab.worlds.shapes.students``), loaded as their real counterparts are."""

BUILTIN_MODELS = [
    ModelSpec("tiny-sd", "builtin:tiny-sd", "StableDiffusionPipeline", "ddim", 30, 5.0, role="test",
              notes="random tiny SD (tests, demos, benchmarks)"),
    ModelSpec("tiny-sdxl", "builtin:tiny-sdxl", "StableDiffusionXLPipeline", "euler", 30, 5.0, role="test",
              notes="random tiny SDXL"),
    ModelSpec("tiny-lcm", "builtin:tiny-lcm", "LatentConsistencyModelPipeline", "lcm", 4, 8.0, role="test",
              notes="random tiny LCM (w-embedding UNet)"),
    ModelSpec("micro-sd", "micro:micro-sd", "StableDiffusionPipeline", "ddim", 30, 4.0,
              notes="micro-world teacher trained on sklearn digits (data/micro)"),
    ModelSpec("micro-lcm", "micro:micro-lcm", "LatentConsistencyModelPipeline", "lcm", 4, 4.0, role="student",
              notes="micro-world LCM distilled from micro-sd"),
    ModelSpec("micro-lcm-lora", "micro:micro-sd", "StableDiffusionPipeline", "lcm", 4, 1.0, role="student",
              loras=(Lora("micro:micro-lcm-lora"),), notes="micro-world LCM-LoRA on micro-sd"),
    ModelSpec("micro-pcm", "micro:micro-sd", "StableDiffusionPipeline", "tcd-trailing", 4, 1.0, role="student",
              loras=(Lora("micro:micro-pcm"),), notes="micro-world PCM LoRA on micro-sd (4 phases, adversarial consistency "
                                                     "loss); TCD trailing (gamma 0) or DDIM trailing at 1/2/4/8 steps"),
    ModelSpec("micro-tlcm", "micro:micro-sd", "StableDiffusionPipeline", "tcd-trailing", 4, 1.0, role="student",
              loras=(Lora("micro:micro-tlcm"),), notes="micro-world TLCM: data-free multistep latent consistency, PEFT "
                                                      "adapter on micro-sd; 2-8 steps"),
    ModelSpec("micro-turbo", "micro:micro-turbo", "StableDiffusionPipeline", "euler-ancestral-trailing", 2, 0.0, role="student",
              notes="micro-world ADD student (SDXL-Turbo recipe): 1-4 steps, guidance 0; 2 recommended (its 1-step "
                    "samples are still blurred after the CPU-sized run)"),
    ModelSpec("micro-dmd", "micro:micro-sd", "StableDiffusionPipeline", "lcm", 4, 1.0, unet="micro:micro-dmd", role="student",
              notes="micro-world DMD2 generator (UNet swapped into micro-sd, LCM scheduler): 1-4 steps"),
    ModelSpec("shapes-sd", "world:shapes/shapes-sd", "StableDiffusionPipeline", "ddim", 30, 4.0,
              notes="shapes-world teacher (compositional scenes, attribute judge; data/worlds/shapes)"),
    *SHAPES_STUDENTS,
]


def _exact_specs() -> list[ModelSpec]:
    from trajlab.models.exact_presets import EXACT_WORLDS

    return [ModelSpec(f"exact:{k}", f"exact:{k}", "ExactWorldPipeline", "ddim", 30, 1.0, role="exact",
                      notes="closed-form denoiser world (docs/theory.md §2)") for k in EXACT_WORLDS]


def registry() -> dict[str, ModelSpec]:
    """All named models, name -> spec."""
    return {m.name: m for m in REAL_MODELS + BUILTIN_MODELS + _exact_specs()}


def get(name: str) -> ModelSpec | None:
    """The spec of a registered name; ``exact:FILE.toml`` / ``exact:{json}`` get an ad-hoc exact-world spec."""
    spec = registry().get(name)
    if spec is None and name.startswith("exact:") and (name.endswith(".toml") or name[6:].lstrip().startswith("{")):
        spec = ModelSpec(name, name, "ExactWorldPipeline", "ddim", 30, 1.0, role="exact",
                         notes="custom closed-form world (recipe file or JSON)")
    return spec


def parse_lora(text: str) -> Lora:
    """``PATH_OR_ID[:SCALE]`` -> :class:`Lora` (a trailing ``:number`` is the scale)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return Lora(head, float(tail))
        except ValueError:
            pass
    return Lora(text)
