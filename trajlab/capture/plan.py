"""The capture plan: one run configuration = one store group (no torch import: validated before any load)."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field

import numpy as np


class PlanError(ValueError):
    """A capture plan is invalid; raised before any model loads."""


SEED_LIMIT = 2**63
"""Seeds are stored as int64 and seed torch generators: 0 <= seed < 2**63."""
DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?|mps")


@dataclass
class CapturePlan:
    """One run configuration = one store group.

    ``guidance`` is the pipeline's ``guidance_scale``; ``height``/``width`` in pixels (None = the
    pipeline's default); ``dtype`` one of fp32/fp16/bf16/fp64; ``hybrid`` is filled by hybrid runs.
    ``taps``: named module taps (module names or tables, :class:`trajlab.capture.module_taps.TapSpec`; stored
    in canonical form); ``attention_maps``: record the cross-attention maps. Both opt-in; when set they are
    part of the group's checked config (not of its name: the same group captured with other taps is refused).
    """

    model: str
    prompts: list[str]
    seeds: list[int]
    scheduler: str = "default"
    steps: int = 30
    guidance: float = 7.5
    negative_prompt: str | None = None
    loras: list[str] = field(default_factory=list)
    height: int | None = None
    width: int | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    images: bool = True
    batch_size: int = 8
    extra: dict = field(default_factory=dict)
    taps: list = field(default_factory=list)
    attention_maps: bool = False

    def validate(self) -> None:
        """Every field typed and in range (one line each, no torch import): what a TOML file, a flag or a
        caller may get wrong is refused here, before any model loads."""
        from trajlab.models.loading import DTYPES
        from trajlab.models.schedulers import check_scheduler_name

        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if not isinstance(self.model, str) or not self.model.strip():
            raise PlanError(f"model={self.model!r}: expected a model name")
        if not isinstance(self.prompts, (list, tuple)):
            raise PlanError(f"prompts={self.prompts!r}: expected a list of strings, got {type(self.prompts).__name__}")
        if not self.prompts:
            raise PlanError("prompts is empty: give at least one --prompt or a --prompts file with lines")
        if any(not isinstance(p, str) for p in self.prompts):
            raise PlanError(f"prompts must be strings; got {[type(p).__name__ for p in self.prompts]}")
        if not isinstance(self.seeds, (list, tuple)) or not all(is_int(s) for s in self.seeds):
            raise PlanError(f"seeds={self.seeds!r}: expected a list of integers")
        if not self.seeds:
            raise PlanError("seeds is empty: give e.g. --seeds 0:32")
        bad = [s for s in self.seeds if not 0 <= s < SEED_LIMIT]
        if bad:
            raise PlanError(f"seed {bad[0]} is out of range: seeds must be in [0, 2**63)")
        if len(set(self.seeds)) != len(self.seeds):
            raise PlanError(f"seeds contain duplicates: {self.seeds}")
        if not is_int(self.steps) or self.steps < 1:
            raise PlanError(f"steps={self.steps!r}: must be an integer >= 1")
        if (not isinstance(self.guidance, numbers.Real) or isinstance(self.guidance, bool)
                or not math.isfinite(self.guidance) or self.guidance < 0):
            raise PlanError(f"guidance={self.guidance!r}: must be a finite number >= 0")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise PlanError(f"batch_size={self.batch_size!r}: must be an integer >= 1")
        if self.dtype not in DTYPES:
            raise PlanError(f"dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
        for side in ("height", "width"):
            v = getattr(self, side)
            if v is not None and (not is_int(v) or v < 8 or v % 8):
                raise PlanError(f"{side}={v!r}: must be a positive multiple of 8")
        if not isinstance(self.images, bool):
            raise PlanError(f"images={self.images!r}: expected true or false")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise PlanError(f"negative_prompt={self.negative_prompt!r}: expected a string")
        if not isinstance(self.loras, (list, tuple)) or not all(isinstance(x, str) and x for x in self.loras):
            raise PlanError(f"loras={self.loras!r}: expected a list of LoRA ids or paths")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise PlanError(f"device={self.device!r}: expected cpu, cuda, cuda:N or mps")
        if not isinstance(self.scheduler, str):
            raise PlanError(f"scheduler={self.scheduler!r}: expected a scheduler name")
        try:
            check_scheduler_name(self.scheduler)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        from trajlab.capture.module_taps import TapError, parse_taps

        try:
            self.taps = parse_taps(self.taps)
        except TapError as exc:
            raise PlanError(str(exc)) from None
        if not isinstance(self.attention_maps, bool):
            raise PlanError(f"attention_maps={self.attention_maps!r}: expected true or false")
        self._check_pipeline_accepts_scheduler()

    def _check_pipeline_accepts_scheduler(self) -> None:
        """Refuse stock-diffusers combinations that crash mid-run. LatentConsistencyModelPipeline passes
        ``eta=None`` to ``scheduler.step``; TCDScheduler asserts 0 <= eta (its gamma) <= 1 and fails there."""
        from trajlab.models.registry import get

        spec = get(self.model)
        if spec is not None and spec.pipeline == "LatentConsistencyModelPipeline" and self.negative_prompt:
            raise PlanError(f"model {self.model!r} is a LatentConsistencyModelPipeline, which takes no negative prompt "
                            "(LCM pipelines guide through a w-embedding and ignore negative prompts by construction); "
                            "drop --negative-prompt")
        if spec is not None and spec.pipeline == "LatentConsistencyModelPipeline" and self.scheduler.startswith("tcd"):
            raise PlanError(f"scheduler={self.scheduler!r} with model {self.model!r} (a LatentConsistencyModelPipeline): "
                            "that pipeline passes eta=None, which TCDScheduler rejects; use scheduler 'lcm', or a "
                            "StableDiffusionPipeline student such as micro-lcm-lora (eta 0: deterministic TCD)")

    @property
    def n_samples(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def config(self) -> dict:
        """The fields that define the group's content (and name: see :meth:`group_name`)."""
        d = asdict(self)
        for k in ("device", "batch_size"):
            d.pop(k)
        for k in ("taps", "attention_maps"):  # opt-in views: in the config only when on (older groups lack them)
            if not d[k]:
                d.pop(k)
        return d

    def group_config(self) -> dict:
        """What a group is checked against before a run resumes or joins it (stored as its ``config``
        attr): :meth:`config` and ``batch_size``, which fixes the blocks that shards and resumes split the
        samples into (and, through batched reductions, the bits of each sample). Not the device: shards
        may run anywhere. The group name is not part of it (``extra["group"]`` is ignored in the check)."""
        return {**self.config(), "batch_size": self.batch_size}

    def group_name(self) -> str:
        """Readable group name: model, scheduler, steps, guidance, negative prompt (its label, see
        :mod:`trajlab.store_groups`) + a hash of the rest but the seeds: a capture with more seeds grows the
        same group."""
        neg = "none" if not self.negative_prompt else "neg-" + hashlib.sha1(self.negative_prompt.encode()).hexdigest()[:6]
        rest = {k: v for k, v in self.config().items()
                if k not in ("model", "scheduler", "steps", "guidance", "negative_prompt", "seeds", "taps",
                             "attention_maps")}
        tag = hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:6]
        model = re.sub(r"[^A-Za-z0-9_.+-]+", "-", self.model).strip("-")
        if self.loras:
            model += "+lora"
        g = f"{self.guidance:g}"
        return f"{model}__{self.scheduler}__{self.steps}steps__cfg{g}__{neg}__{tag}"

    def sample_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_index, seed) per sample, prompt-major."""
        pi = np.repeat(np.arange(len(self.prompts)), len(self.seeds))
        seeds = np.tile(np.asarray(self.seeds, dtype=np.int64), len(self.prompts))
        return pi, seeds
