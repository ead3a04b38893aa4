"""Load a pipeline by registry name, hub id or local diffusers folder, with LoRAs.

Nothing is ever downloaded: hub ids are resolved in the local Hugging Face cache only
(``local_files_only=True``), so a missing checkpoint fails at once with a message that says what to
download and where it was looked for, instead of a stack trace after 30 s of retries.
"""

from __future__ import annotations

import os
from pathlib import Path

from trajlab.models import registry as reg
from trajlab.models.registry import Lora, ModelSpec

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16", "fp64": "float64", "float64": "float64"}


class ModelNotAvailable(RuntimeError):
    """A checkpoint is not present locally; the message says what to fetch and where it was sought."""


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} unknown; expected one of {sorted(DTYPES)}")
    return getattr(torch, DTYPES[name])


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _is_local(source: str) -> bool:
    return os.path.exists(os.path.expanduser(source))


def resolve_hub(repo_id: str, what: str = "model") -> str:
    """Local snapshot folder of ``repo_id`` from the HF cache, or :class:`ModelNotAvailable`."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        raise ModelNotAvailable(
            f"{what} {repo_id!r} is not available offline: looked in the Hugging Face cache {hub_cache_dir()} "
            f"(set HF_HOME / HF_HUB_CACHE to change it) and found no snapshot. On a machine with internet run "
            f"`hf download {repo_id}` (or huggingface-cli download) and copy the cache here, or pass a local "
            f"diffusers folder to --model."
        ) from None


def _micro_folder(name: str) -> str:
    try:
        from trajlab.models.micro import micro_paths
    except ImportError as exc:
        raise ModelNotAvailable(f"micro-world model {name!r} needs trajlab.models.micro ({exc})") from None
    path = Path(micro_paths()[name])
    if not path.exists():
        raise ModelNotAvailable(f"micro-world weights {name!r} not found at {path}; run `make train-micro` to build them")
    return str(path)


def _world_folder(ref: str) -> str:
    from trajlab.worlds import world_path

    try:
        path = world_path(ref)
    except ValueError as exc:
        raise ModelNotAvailable(str(exc)) from None
    if not path.exists():
        world = ref.split("/")[0]
        raise ModelNotAvailable(f"world weights {ref!r} not found at {path}; run `make train-world` "
                                f"(python -m trajlab.worlds.{world}.train) to build them")
    return str(path)


def resolve_source(source: str, what: str = "model") -> str:
    """A local path for ``source``: local folder/file, ``micro:NAME``, ``world:WORLD/NAME`` or a cached hub id."""
    if source.startswith("micro:"):
        return _micro_folder(source.split(":", 1)[1])
    if source.startswith("world:"):
        return _world_folder(source.split(":", 1)[1])
    if _is_local(source):
        return os.path.expanduser(source)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return resolve_hub(source, what)
    raise ModelNotAvailable(f"{what} {source!r} is neither a registered model ({', '.join(sorted(reg.registry()))}), "
                            f"a local folder, nor a hub id of the form owner/name")


def spec_for(model: str) -> ModelSpec:
    """The registry spec for ``model``, or an ad-hoc spec for a hub id / local folder."""
    spec = reg.get(model)
    if spec is not None:
        return spec
    if model.startswith("exact:"):
        raise ModelNotAvailable(f"unknown exact world {model!r}; known: {[n for n in reg.registry() if n.startswith('exact:')]}")
    resolve_source(model)  # fail fast with a clear message
    return ModelSpec(name=model, source=model, pipeline="auto", scheduler="default", steps=30, guidance=7.5, role="custom")


def check_available(model: str, loras: tuple[Lora, ...] = ()) -> ModelSpec:
    """Fail fast (before any weights load) if a model or LoRA is not present locally."""
    spec = spec_for(model)
    if spec.source.startswith("exact:"):
        from trajlab.models.exact_presets import exact_recipe

        try:
            exact_recipe(spec.source)
        except ValueError as exc:
            raise ModelNotAvailable(str(exc)) from None
    if not spec.source.startswith(("builtin:", "exact:")):
        resolve_source(spec.source)
    if spec.unet:
        resolve_source(spec.unet, "UNet")
    for lora in spec.loras + tuple(loras):
        _check_lora_file(lora, resolve_source(lora.source, "LoRA"))
    return spec


def _check_lora_file(lora: Lora, path: str) -> None:
    """A LoRA folder (a local one or a cached hub snapshot) that lacks the named weight file fails here, before
    any weights load (e.g. a partial download of a multi-file repo such as PCM_Weights)."""
    if not lora.weight_name or not os.path.isdir(path):
        return
    folder = os.path.join(path, lora.subfolder) if lora.subfolder else path
    if not os.path.isfile(os.path.join(folder, lora.weight_name)):
        rel = f"{lora.subfolder}/{lora.weight_name}" if lora.subfolder else lora.weight_name
        present = sorted(os.listdir(folder))[:12] if os.path.isdir(folder) else []
        raise ModelNotAvailable(
            f"LoRA {lora.source!r}: the file {rel!r} is not in {folder} (found: {present or 'nothing'}). Download it "
            f"(`hf download {lora.source} {rel}`) or pass the file you have with --lora PATH")


def _from_pretrained(spec: ModelSpec, dtype):
    import diffusers

    path = resolve_source(spec.source)
    kwargs = {"dtype": dtype, "local_files_only": True}
    if spec.unet:
        kwargs["unet"] = diffusers.UNet2DConditionModel.from_pretrained(resolve_source(spec.unet, "UNet"), **kwargs)
    cls = diffusers.DiffusionPipeline if spec.pipeline == "auto" else getattr(diffusers, spec.pipeline)
    if spec.pipeline in ("StableDiffusionPipeline", "auto"):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(path, **kwargs)
    except TypeError:
        kwargs.pop("safety_checker", None), kwargs.pop("requires_safety_checker", None)
        return cls.from_pretrained(path, **kwargs)


def apply_loras(pipe, loras: tuple[Lora, ...]) -> list[str]:
    """Load LoRAs as named adapters and activate them with their scales; returns adapter names."""
    names = []
    for i, lora in enumerate(loras):
        path = resolve_source(lora.source, "LoRA")
        kwargs = {"adapter_name": f"lora{i}", "local_files_only": True}
        if lora.weight_name:
            kwargs["weight_name"] = lora.weight_name
        if lora.subfolder:
            kwargs["subfolder"] = lora.subfolder
        if os.path.isfile(path):
            kwargs["weight_name"] = os.path.basename(path)
            path = os.path.dirname(path) or "."
        peft_files = peft_adapter_files(path, kwargs.get("weight_name"), kwargs.get("subfolder"))
        if peft_files is not None:
            load_peft_adapter(pipe, *peft_files, adapter_name=kwargs["adapter_name"])
        else:
            pipe.load_lora_weights(path, **kwargs)
        names.append(kwargs["adapter_name"])
    if names:
        pipe.set_adapters(names, adapter_weights=[lo.scale for lo in loras])
    return names


PEFT_PREFIX = "base_model.model."
"""Key prefix of a state dict saved by ``PeftModel.save_pretrained`` (``get_peft_model(unet, cfg)``)."""


def _state_dict_keys(file: str) -> list[str]:
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    return []


def peft_adapter_files(folder: str, weight_name: str | None = None, subfolder: str | None = None):
    """``(folder, weights file)`` when a LoRA is a PEFT adapter (``adapter_config.json`` next to weights whose
    keys start with ``base_model.model.``, as ``PeftModel.save_pretrained`` writes them: TLCM's checkpoints),
    else ``None`` (a diffusers/kohya LoRA file for ``load_lora_weights``).

    diffusers' ``load_lora_weights`` finds no ``unet.`` keys in such a file and loads NOTHING (it only logs a
    warning), so these go through :func:`load_peft_adapter`.  PEFT-format weights without their
    ``adapter_config.json`` are refused: their ``lora_alpha`` (hence the LoRA's scale) is unknown."""
    if subfolder:
        folder = os.path.join(folder, subfolder)
    has_config = os.path.isfile(os.path.join(folder, "adapter_config.json"))
    names = [weight_name] if weight_name else ["adapter_model.safetensors", "adapter_model.bin"]
    files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if not files:
        if has_config and not weight_name:
            raise ModelNotAvailable(f"PEFT adapter folder {folder} has adapter_config.json but no adapter_model.safetensors"
                                    f" / adapter_model.bin")
        return None
    file = files[0]
    keys = _state_dict_keys(file)
    peft_keys = bool(keys) and all(k.startswith(PEFT_PREFIX) for k in keys)
    if has_config and (peft_keys or not file.endswith(".safetensors")):
        return folder, file
    if peft_keys:
        raise ModelNotAvailable(f"{file} holds a PEFT adapter state dict (keys {PEFT_PREFIX}...) but {folder} has no "
                                "adapter_config.json: its rank/alpha are unknown. Put the adapter_config.json that came "
                                "with it next to it")
    return None


def load_peft_adapter(pipe, folder: str, file: str, adapter_name: str) -> None:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + weights) into ``pipe.unet`` as adapter ``adapter_name``.

    The equivalent of TLCM's README (``get_peft_model(unet, LoraConfig(r=64, ...))`` then
    ``unet.load_adapter(lora_path)``), but the UNet stays a diffusers ``UNet2DConditionModel`` (diffusers'
    ``add_adapter`` + PEFT's ``set_peft_model_state_dict``), so ``set_adapters`` / ``disable_lora`` and the
    capture taps work as for any LoRA.  Rank, alpha and target modules come from ``adapter_config.json``
    (as PEFT's ``PeftModel.from_pretrained`` reads them).  Every LoRA tensor of the adapter must be filled."""
    import torch
    from peft import PeftConfig, set_peft_model_state_dict

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise TypeError(f"{type(pipe).__name__} has no unet to load the PEFT adapter {folder} into")
    config = PeftConfig.from_pretrained(folder)
    config.inference_mode = True
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    unet.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if unexpected or missing:
        raise ValueError(f"PEFT adapter {file} does not fit {type(unet).__name__}: {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]}), {len(missing)} missing LoRA tensors (e.g. {missing[:2]})")


def load_pipeline(model: str, *, loras: tuple[Lora, ...] = (), dtype: str = "fp32", device: str = "cpu",
                  scheduler: str | None = None):
    """Build a ready pipeline: weights, LoRAs, scheduler (``None`` = the spec's recommended one), dtype, device."""
    from trajlab.models.schedulers import make_scheduler

    spec = check_available(model, loras)
    td = torch_dtype(dtype)
    if spec.source.startswith("builtin:"):
        from trajlab.models.tiny import BUILDERS

        pipe = BUILDERS[spec.source.split(":", 1)[1]]()
    elif spec.source.startswith("exact:"):
        from trajlab.models.exact import build_exact_world
        from trajlab.models.exact_presets import exact_recipe

        pipe = build_exact_world(exact_recipe(spec.source))
    else:
        pipe = _from_pretrained(spec, td)
    apply_loras(pipe, spec.loras + tuple(loras))
    name = scheduler or spec.scheduler
    if name != "default":
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    if spec.source.startswith(("builtin:", "exact:")) and dtype not in ("fp32", "float32"):
        pipe = pipe.to(dtype=td)
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
