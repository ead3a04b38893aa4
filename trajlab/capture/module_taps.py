"""Named activation taps on the denoiser's modules, and cross-attention maps recomputed beside SDPA.

**Names.** A tap names a module of the pipeline's denoiser (``unet`` / ``transformer``) as
``named_modules()`` names it: ``mid_block``, ``down_blocks.1.attentions.0``,
``up_blocks.0.attentions.0.transformer_blocks.0.attn2``, ... (``trajlab taps MODEL`` lists them).
Containers without a forward of their own (``ModuleList``, ``ModuleDict``) cannot be tapped. A name that
does not exist is refused with the nearest names (:func:`check_names`), before any sample runs.

**What is stored** (per tap, per sample and step: the denoiser forward whose output went into the
step's ``scheduler.step`` call): the module's output (the first element of a tuple output, ``.sample`` of
an output object), its batch split into the CFG halves when the denoiser ran on a doubled batch:
``branch`` ``cond`` (default), ``uncond`` or ``both`` (a ``branch`` dim, ``uncond`` first, as diffusers
orders them); without CFG the one forward is stored and ``branch`` is recorded as ``single``. Optional
reductions, done on the device before the host copy: ``channels`` (a subset of the channel axis: dim 1 of
a (B, C, H, W) output, the last dim otherwise), ``reduce="spatial_mean"`` (mean over H, W of a 4-d output,
over tokens of a (B, N, D) output, computed in float32), ``dtype="float16"`` storage. Dims are labelled by
output rank: (channel, y, x), (token, feature), (feature,), each prefixed with the variable name so taps of
different sizes never share a dim.

**Cross-attention maps.** SDPA returns no weights, so for every cross-attention layer (a diffusers
``Attention`` with ``is_cross_attention``) a forward hook recomputes ``softmax(Q K^T * scale)`` from the
layer's own ``to_q`` / ``to_k`` (and its group/cross/q/k norms) on the layer's inputs, after the layer has
run; it never touches the layer's output. The maps are aggregated as DAAM does: per layer, the mean over
heads is upsampled to the latent grid (bilinear, so every latent cell stays a distribution over tokens;
DAAM uses bicubic clamped at 0), summed over layers and divided by their number: ``attention[sample,
step, token, y, x]`` is the mean attention mass that position (y, x) of the latent grid gives token
``token`` at that step, over heads and layers. Tokens are the tokenizer's, SOS and EOS included, up to
the longest prompt of the group; attention to the padding after it is not stored (so the stored tokens
sum to <= 1 per cell). CFG: the conditional half.

Hooks observe only (outputs stay bitwise identical with capture on: tests/test_module_taps.py); they are
removed when the context exits, also on error. Recomputing Q and K calls ``to_q`` / ``to_k`` again, so a
tap on those very modules ignores those calls.

Nothing at module level imports torch: :class:`TapSpec` is checked with the plan, before any load.
"""

from __future__ import annotations

import difflib
import numbers
import threading
from dataclasses import asdict, dataclass

REDUCTIONS = ("none", "spatial_mean")
DTYPES = ("native", "float16", "float32")
BRANCHES = ("cond", "uncond", "both")
TAP_PREFIX = "tap."
ATTENTION_VARIABLE = "attention"
ATTENTION_DTYPE = "float16"


class TapError(ValueError):
    """A tap that cannot be installed or stored (a name that does not exist, a bad option): one line."""


# -- the spec (no torch) ------------------------------------------------------------------------------
def parse_channels(value) -> list[int] | None:
    """``None`` | ``"0:8"`` (half-open) | ``"0,3,5"`` | ``[0, 3, 5]`` -> sorted unique channel indices or None."""
    if value is None or value == "" or value == []:
        return None
    out: list[int] = []
    if isinstance(value, str):
        for part in value.split(","):
            part = part.strip()
            try:
                if ":" in part:
                    a, b = (int(x) for x in part.split(":"))
                    if b <= a:
                        raise ValueError
                    out += range(a, b)
                elif part:
                    out.append(int(part))
            except ValueError:
                raise TapError(f"channels {value!r}: expected START:STOP (half-open) or a comma list of indices") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                  for v in value):
        out = [int(v) for v in value]
    else:
        raise TapError(f"channels {value!r}: expected START:STOP, a comma list or a list of integers")
    if not out or min(out) < 0:
        raise TapError(f"channels {value!r}: expected non-negative channel indices")
    return sorted(set(out))


@dataclass(frozen=True)
class TapSpec:
    """One named tap: the module, its reduction, channel subset, storage dtype and CFG branch."""

    name: str
    reduce: str = "none"
    channels: tuple[int, ...] | None = None
    dtype: str = "native"
    branch: str = "cond"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip() or self.name != self.name.strip():
            raise TapError(f"tap name {self.name!r}: expected a module name such as mid_block")
        reduce = {"mean": "spatial_mean", None: "none"}.get(self.reduce, self.reduce)
        object.__setattr__(self, "reduce", reduce)
        if reduce not in REDUCTIONS:
            raise TapError(f"tap {self.name}: reduce={self.reduce!r}: expected one of {', '.join(REDUCTIONS)}")
        dtype = {"fp16": "float16", "fp32": "float32", None: "native"}.get(self.dtype, self.dtype)
        object.__setattr__(self, "dtype", dtype)
        if dtype not in DTYPES:
            raise TapError(f"tap {self.name}: dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.branch not in BRANCHES:
            raise TapError(f"tap {self.name}: branch={self.branch!r}: expected one of {', '.join(BRANCHES)}")
        ch = parse_channels(list(self.channels) if isinstance(self.channels, tuple) else self.channels)
        object.__setattr__(self, "channels", None if ch is None else tuple(ch))

    @property
    def variable(self) -> str:
        return TAP_PREFIX + self.name

    def to_dict(self) -> dict:
        """The canonical form stored in a group's config (every key, channels as a list)."""
        d = asdict(self)
        d["channels"] = None if self.channels is None else list(self.channels)
        return d

    @classmethod
    def parse(cls, value, defaults: dict | None = None) -> TapSpec:
        """A module name (with ``defaults`` for the options) or a table ``{name = ..., reduce = ..., channels =
        ..., dtype = ..., branch = ...}``."""
        if isinstance(value, TapSpec):
            return value
        if isinstance(value, str):
            return cls(name=value, **(defaults or {}))
        if isinstance(value, dict):
            unknown = set(value) - {"name", "reduce", "channels", "dtype", "branch"}
            if unknown:
                raise TapError(f"tap {value!r}: unknown keys {sorted(unknown)}; allowed: name, reduce, channels, dtype, "
                               "branch")
            if "name" not in value:
                raise TapError(f"tap {value!r}: needs a name (the module, e.g. mid_block)")
            return cls(**{**(defaults or {}), **value})
        raise TapError(f"tap {value!r}: expected a module name or a table with a name")


def parse_taps(values, defaults: dict | None = None) -> list[dict]:
    """Tap specs (names or tables) -> their canonical dicts, in order; a name given twice is refused."""
    if values is None:
        return []
    if isinstance(values, (str, dict, TapSpec)):
        values = [values]
    if not isinstance(values, (list, tuple)):
        raise TapError(f"taps={values!r}: expected a list of module names or tables")
    specs = [TapSpec.parse(v, defaults) for v in values]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TapError(f"tap {dup[0]!r} is given twice")
    return [s.to_dict() for s in specs]


# -- module names --------------------------------------------------------------------------------------
def tappable(denoiser) -> dict:
    """{name: module} of every module of ``denoiser`` a tap may name (the root and forward-less containers
    excluded), in ``named_modules`` order."""
    import torch

    return {n: m for n, m in denoiser.named_modules() if n and not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))}


def check_names(names, available, *, where: str = "") -> None:
    """Refuse names that are not in ``available`` (one line, with the nearest names by difflib)."""
    available = list(available)
    for name in names:
        if name in available:
            continue
        children = [a for a in available if a.startswith(name + ".") and a.count(".") == name.count(".") + 1]
        if children:
            raise TapError(f"{where}tap {name!r} is a container without a forward of its own: tap one of its items, "
                           f"{', '.join(children[:4])}")
        close = difflib.get_close_matches(name, available, n=4, cutoff=0.5)
        hint = f"; nearest: {', '.join(close)}" if close else " (list them: trajlab taps MODEL)"
        raise TapError(f"{where}tap {name!r}: no such module in the denoiser{hint}")


def cross_attention_layers(denoiser) -> dict:
    """{name: module} of the denoiser's cross-attention layers (diffusers ``Attention``, ``is_cross_attention``)."""
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return {}
    return {n: m for n, m in denoiser.named_modules() if isinstance(m, Attention) and getattr(m, "is_cross_attention", False)}


def denoiser_skeleton(model: str, loras=()):
    """The denoiser of registry model / folder / hub id ``model`` with its module tree only: built on the meta
    device from its config (no weights read) when it comes from a folder; built in full for the tiny and
    exact models (they are built in code, in well under a second)."""
    import json
    import os

    import torch

    from trajlab.capture.taps import denoiser_of
    from trajlab.models.loading import check_available, resolve_source

    spec = check_available(model, tuple(loras))
    if spec.source.startswith("builtin:"):
        from trajlab.models.tiny import BUILDERS

        return denoiser_of(BUILDERS[spec.source.split(":", 1)[1]]())
    if spec.source.startswith("exact:"):
        from trajlab.models.exact import build_exact_world
        from trajlab.models.exact_presets import exact_recipe

        return denoiser_of(build_exact_world(exact_recipe(spec.source)))
    import diffusers

    if spec.unet:
        folder, cls_name = resolve_source(spec.unet, "UNet"), "UNet2DConditionModel"
    else:
        root = resolve_source(spec.source)
        index = json.load(open(os.path.join(root, "model_index.json")))
        part = next((p for p in ("unet", "transformer", "prior") if isinstance(index.get(p), list) and index[p][1]), None)
        if part is None:
            raise TapError(f"{model}: its model_index.json names no unet/transformer denoiser")
        folder, cls_name = os.path.join(root, part), index[part][1]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with torch.device("meta"):
        return getattr(diffusers, cls_name).from_config(config)


def describe_modules(denoiser) -> list[tuple[str, str, str]]:
    """(name, class, note) per tappable module; the note marks cross-attention layers."""
    cross = set(cross_attention_layers(denoiser))
    return [(n, type(m).__name__, "cross-attention" if n in cross else "") for n, m in tappable(denoiser).items()]


# -- the hooks (torch) ----------------------------------------------------------------------------------
def _tensor_of(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TapError(f"tap output of type {type(output).__name__} holds no tensor to store")


def _halves(t, batch_size: int, branch: str):
    """The stored rows of a denoiser-batch tensor: a CFG half (or both, stacked on dim 1), or all rows."""
    n = t.shape[0]
    if n == 2 * batch_size:
        uncond, cond = t.chunk(2)
        if branch == "both":
            import torch

            return torch.stack([uncond, cond], dim=1), "both"
        return (cond if branch == "cond" else uncond), branch
    if n != batch_size:
        raise TapError(f"a tapped output has batch {n}; the pipeline call has {batch_size} samples (or 2x with CFG)")
    return t, "single"


def reduce_output(t, spec: dict, branch: str = "cond"):
    """Channel subset, spatial mean and storage dtype of a (B, [branch,] ...) output tensor."""
    import torch

    lead = 2 if branch == "both" else 1
    rank = t.ndim - lead
    if spec["channels"] is not None:
        axis = lead if rank == 3 else t.ndim - 1
        size = t.shape[axis]
        if max(spec["channels"]) >= size:
            raise TapError(f"tap {spec['name']}: channels up to {max(spec['channels'])} asked; the output has {size} "
                           f"along its channel axis")
        t = t.index_select(axis, torch.tensor(spec["channels"], device=t.device))
    if spec["reduce"] == "spatial_mean":
        if rank == 3:
            t = t.float().mean(dim=(lead + 1, lead + 2))
        elif rank == 2:
            t = t.float().mean(dim=lead)
        # rank 1 (B, D): nothing spatial to average
    if spec["dtype"] == "float16":
        t = t.to(torch.float16)
    elif spec["dtype"] == "float32":
        t = t.float()
    return t


def tap_dims(variable: str, rank: int, reduce: str, branch: str) -> tuple[str, ...]:
    """Labelled dims of a stored tap after (sample, step): ``rank`` is the module output's rank without the
    batch dim; each dim is prefixed with the variable name (taps of different sizes never share a dim)."""
    if rank == 3:
        names = ("channel",) if reduce == "spatial_mean" else ("channel", "y", "x")
    elif rank == 2:
        names = ("feature",) if reduce == "spatial_mean" else ("token", "feature")
    elif rank == 1:
        names = ("feature",)
    else:
        names = tuple(f"d{i}" for i in range(rank))
    return (("branch",) if branch == "both" else ()) + tuple(f"{variable}.{n}" for n in names)


class _Quiet(threading.local):
    active = False


_QUIET = _Quiet()


class ModuleTaps:
    """Forward hooks on named denoiser modules and (optionally) the cross-attention maps of one pipeline call
    of ``batch_size`` samples. :meth:`take` returns the host copies made since the last call ({variable:
    (B, ...) tensor}) and is called by the capture recorder at each ``scheduler.step``."""

    def __init__(self, denoiser, taps: list[dict], batch_size: int, *, attention_tokens: int | None = None,
                 to_host=None):
        from trajlab.capture.records import to_host as _to_host

        self.denoiser, self.batch_size, self.to_host = denoiser, batch_size, to_host or _to_host
        self.specs = [dict(s) for s in taps]
        self.modules = tappable(denoiser)
        check_names([s["name"] for s in self.specs], self.modules)
        self.attention_tokens = attention_tokens
        self.attention_layers = cross_attention_layers(denoiser) if attention_tokens else {}
        self.info: dict[str, dict] = {}
        """{variable: {"module", "class", "branch", "dims"}} of every tap that has fired (for the store layout)."""
        self._pending: dict = {}
        self._acc = None
        self._n_layers = 0
        self._grid = None
        self._handles: list = []

    # -- hooks
    def _tap_hook(self, spec):
        def hook(_module, _args, output):
            if _QUIET.active:
                return
            raw = _tensor_of(output).detach()
            t, branch = _halves(raw, self.batch_size, spec["branch"])
            var = TAP_PREFIX + spec["name"]
            if var not in self.info:
                self.info[var] = {"module": spec["name"], "class": type(_module).__name__, "branch": branch,
                                  "dims": tap_dims(var, raw.ndim - 1, spec["reduce"], branch)}
            self._pending[var] = self.to_host(reduce_output(t, spec, branch))
        return hook

    def _grid_hook(self, _module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self._grid = tuple(sample.shape[-2:])

    def _attention_hook(self, name):
        def hook(attn, args, kwargs, _output):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if context is None:
                return
            probs = self._attention_probs(attn, hidden, context)  # (2B or B, heads, N, T)
            self._add_layer(name, probs)
        return hook

    def _attention_probs(self, attn, hidden, context):
        import torch

        _QUIET.active = True
        try:
            with torch.no_grad():
                if hidden.ndim == 4:
                    b, c, h, w = hidden.shape
                    hidden = hidden.view(b, c, h * w).transpose(1, 2)
                if attn.group_norm is not None:
                    hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
                if getattr(attn, "to_q", None) is None or getattr(attn, "to_k", None) is None:
                    raise TapError("attention maps need the layer's to_q and to_k (fused QKV projections are not "
                                   "supported: call pipe.unfuse_qkv_projections())")
                q = attn.to_q(hidden)
                if attn.norm_cross:
                    context = attn.norm_encoder_hidden_states(context)
                k = attn.to_k(context)
                b = q.shape[0]
                d = k.shape[-1] // attn.heads
                q = q.view(b, -1, attn.heads, d).transpose(1, 2)
                k = k.view(b, -1, attn.heads, d).transpose(1, 2)
                if attn.norm_q is not None:
                    q = attn.norm_q(q)
                if attn.norm_k is not None:
                    k = attn.norm_k(k)
                scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * float(attn.scale)
                return scores.softmax(dim=-1)
        finally:
            _QUIET.active = False

    def _add_layer(self, name, probs):
        import torch
        import torch.nn.functional as F

        rows, _ = _halves(probs, self.batch_size, "cond")
        n = rows.shape[2]
        H, W = self._grid
        h, w = _layer_grid(H, W, n, name)
        maps = rows[..., : self.attention_tokens].mean(dim=1)  # (B, N, T): mean over heads
        maps = maps.transpose(1, 2).reshape(maps.shape[0], -1, h, w)
        if (h, w) != (H, W):
            maps = F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=False)
        if maps.shape[1] < self.attention_tokens:  # a shorter text sequence than the group's longest prompt
            maps = torch.nn.functional.pad(maps, (0, 0, 0, 0, 0, self.attention_tokens - maps.shape[1]))
        self._acc = maps if self._acc is None else self._acc + maps
        self._n_layers += 1

    # -- the recorder's side
    def take(self) -> dict:
        """Host copies of every tap (and the attention maps) since the last call; clears them."""
        out, self._pending = self._pending, {}
        if self._acc is not None:
            import torch

            out[ATTENTION_VARIABLE] = self.to_host((self._acc / self._n_layers).to(torch.float16))
            self._acc, self._n_layers = None, 0
        return out

    def __enter__(self):
        try:
            for spec in self.specs:
                self._handles.append(self.modules[spec["name"]].register_forward_hook(self._tap_hook(spec)))
            if self.attention_layers:
                self._handles.append(self.denoiser.register_forward_pre_hook(self._grid_hook, with_kwargs=True))
                for name, layer in self.attention_layers.items():
                    self._handles.append(layer.register_forward_hook(self._attention_hook(name), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False


def _layer_grid(H: int, W: int, n: int, name: str) -> tuple[int, int]:
    """The (h, w) grid of a layer with ``n`` query positions inside a denoiser whose input grid is (H, W)."""
    h, w = H, W
    for _ in range(8):
        if h * w == n:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    raise TapError(f"cross-attention layer {name}: {n} query positions match no downsampling of the {H}x{W} latent grid")


def attention_tokens(pipe, prompts) -> tuple[int, list[list[str]]]:
    """(number of tokens stored, the tokens of each prompt as text, padded with "") for ``prompts``: the
    tokenizer's ids, SOS and EOS included, up to the longest prompt (at most the tokenizer's max length)."""
    tok = getattr(pipe, "tokenizer", None)
    if tok is None:
        raise TapError(f"{type(pipe).__name__} has no tokenizer: attention maps need the prompt's tokens")
    limit = int(getattr(tok, "model_max_length", 77) or 77)
    ids = [tok(p, truncation=True, max_length=limit)["input_ids"] for p in prompts]
    n = max(len(i) for i in ids)
    texts = []
    for row in ids:
        words = [tok.convert_ids_to_tokens(int(i)).replace("</w>", "") for i in row]
        texts.append(words + [""] * (n - len(words)))
    return n, texts


def check_hybrid_branches(taps) -> None:
    """A hybrid's teacher runs CFG and its student may not: only the conditional branch means one thing at
    every step."""
    bad = [t["name"] for t in taps if t.get("branch", "cond") != "cond"]
    if bad:
        raise TapError(f"tap {bad[0]}: branch={next(t['branch'] for t in taps if t['name'] == bad[0])!r} on a hybrid "
                       "pipeline: its teacher runs CFG and its student may not; use branch cond (the default)")


def preflight(plans) -> None:
    """Every plan's taps and attention maps checked against its model's module tree (built without weights,
    :func:`denoiser_skeleton`) before any model loads: a name that does not exist is refused with the nearest."""
    trees: dict = {}
    for plan in plans:
        if not plan.taps and not plan.attention_maps:
            continue
        from trajlab.models.registry import parse_lora

        hybrid = plan.extra.get("hybrid") or {}
        models = [(plan.model, tuple(plan.loras))]
        if hybrid:  # both parts of a hybrid are tapped: the names must exist in each
            check_hybrid_branches(plan.taps)
            models = [(hybrid["teacher"], ()), (hybrid["student"], ())]
        for model, loras in models:
            if (model, loras) not in trees:
                trees[(model, loras)] = denoiser_skeleton(model, tuple(parse_lora(x) for x in loras))
            check_names([t["name"] for t in plan.taps], tappable(trees[(model, loras)]), where=f"{model}: ")
            if plan.attention_maps and not cross_attention_layers(trees[(model, loras)]):
                raise TapError(f"{model}: its denoiser has no cross-attention layer: no attention maps to record")


def taps_from_flags(names, *, reduce=None, channels=None, dtype=None, branch=None) -> list[dict]:
    """``--tap NAME`` (repeatable) with the ``--tap-*`` options applied to every one, in canonical form."""
    options = {k: v for k, v in {"reduce": reduce, "channels": channels, "dtype": dtype, "branch": branch}.items()
               if v is not None}
    if not names and options:
        raise TapError("--tap-reduce/--tap-channels/--tap-dtype/--tap-branch apply to the --tap modules: give --tap NAME")
    return parse_taps(list(names or []), options)


def module_listing(model: str, loras=(), *, depth: int | None = None, grep: str | None = None) -> list[str]:
    """What ``trajlab taps MODEL`` prints: one line per tappable module (name, class, cross-attention marked;
    ``depth``: names of at most that many dotted parts; ``grep``: names or classes containing it), then a summary."""
    from trajlab.models.registry import parse_lora

    rows = describe_modules(denoiser_skeleton(model, tuple(parse_lora(x) for x in loras)))
    shown = [r for r in rows if (depth is None or r[0].count(".") < depth) and (not grep or grep in r[0] or grep in r[1])]
    width = max((len(r[0]) for r in shown), default=4)
    return [f"{n:{width}}  {c}" + (f"  [{note}]" if note else "") for n, c, note in shown] + [
        f"{len(shown)} of {len(rows)} module(s) shown; {sum(1 for r in rows if r[2])} cross-attention layer(s) (what "
        "--attention-maps aggregates). Tap one: trajlab capture --model MODEL ... --tap NAME [--tap-reduce spatial_mean] "
        "[--tap-channels 0:8] [--tap-dtype float16] [--tap-branch cond|uncond|both]"]


__all__ = ["ATTENTION_VARIABLE", "BRANCHES", "DTYPES", "ModuleTaps", "REDUCTIONS", "TAP_PREFIX", "TapError", "TapSpec",
           "attention_tokens", "check_names", "cross_attention_layers", "denoiser_skeleton", "describe_modules", "module_listing",
           "check_hybrid_branches", "parse_channels", "parse_taps", "preflight", "reduce_output", "tap_dims",
           "tappable", "taps_from_flags"]
