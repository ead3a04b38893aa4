"""One capture's views of the denoiser: the named taps and attention maps a plan asks for, checked against the
pipeline's denoiser before anything is written, hooked per pipeline call, and laid out as the store's step arrays.
A hybrid (``DenoiserSwitch``) is tapped in both parts (:class:`SwitchTaps`): each step's values come from the
part that ran it. The hooks themselves: :mod:`trajlab.capture.module_taps`."""

from __future__ import annotations

import contextlib

from trajlab.capture.module_taps import (ATTENTION_DTYPE, ATTENTION_VARIABLE, TAP_PREFIX, ModuleTaps, TapError,
                                         attention_tokens, check_hybrid_branches, check_names, cross_attention_layers,
                                         tappable)


def switch_parts(denoiser) -> list:
    """The denoisers a capture taps: a hybrid's ``DenoiserSwitch`` gives its teacher and student UNets (one when
    both parts are one UNet: the LoRA mechanism), any other denoiser itself."""
    if type(denoiser).__name__ != "DenoiserSwitch":
        return [denoiser]
    return [denoiser.teacher] if denoiser.student is denoiser.teacher else [denoiser.teacher, denoiser.student]


class SwitchTaps:
    """:class:`ModuleTaps` on both parts of a hybrid (teacher and student UNets, the same module names): each
    step's values are those of the part that ran the step; a tap whose shape differs between the parts is a
    :class:`TapError` naming it."""

    def __init__(self, parts, taps: list[dict], batch_size: int, **kwargs):
        self.parts = [ModuleTaps(p, taps, batch_size, **kwargs) for p in parts]
        self._shapes: dict[str, tuple] = {}

    @property
    def info(self) -> dict:
        merged = {}
        for part in reversed(self.parts):  # the teacher's description where both fired
            merged.update(part.info)
        return merged

    def take(self) -> dict:
        out = {}
        for part in self.parts:
            out.update(part.take())
        for var, t in out.items():
            shape = tuple(t.shape[1:])
            if self._shapes.setdefault(var, shape) != shape:
                raise TapError(f"{var}: shape {shape} at this step, {self._shapes[var]} at an earlier one: the "
                               "hybrid's teacher and student differ at this module")
        return out

    def __enter__(self):
        with contextlib.ExitStack() as stack:  # a part that fails to hook unhooks those before it
            for part in self.parts:
                stack.enter_context(part)
            self._hooked = stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self._hooked.__exit__(*exc)


# -- one capture's views: what run.capture plugs in ------------------------------------------------------
class CaptureViews:
    """The named taps and attention maps of one capture (one plan on one pipeline): checked against the
    pipeline's denoiser before anything is written, installed per pipeline call (:meth:`batch`), and turned
    into the store's step arrays (:meth:`step_arrays`) from the first batch."""

    def __init__(self, pipe, taps: list[dict], attention_maps: bool, prompts):
        from trajlab.capture.taps import denoiser_of

        self.denoiser = denoiser_of(pipe)
        self.hybrid = type(self.denoiser).__name__ == "DenoiserSwitch"
        self.parts = switch_parts(self.denoiser)
        self.taps = [dict(t) for t in taps]
        if self.hybrid:  # teacher steps with CFG, student steps maybe without, even on one shared UNet
            check_hybrid_branches(self.taps)
        for part in self.parts:
            check_names([t["name"] for t in self.taps], tappable(part))
            if attention_maps and not cross_attention_layers(part):
                raise TapError(f"{type(part).__name__} has no cross-attention layer: no attention maps to record")
        text_pipe = getattr(pipe, "teacher_pipe", pipe)  # a hybrid: its teacher's tokenizer reads the prompts
        self.n_tokens, self.token_text = (attention_tokens(text_pipe, prompts) if attention_maps else (None, None))
        self.first: ModuleTaps | SwitchTaps | None = None

    @classmethod
    def for_plan(cls, pipe, plan) -> CaptureViews | None:
        """The plan's views, or None when it asks for none."""
        if not plan.taps and not plan.attention_maps:
            return None
        return cls(pipe, plan.taps, plan.attention_maps, plan.prompts)

    def batch(self, recorder, batch_size: int) -> ModuleTaps:
        """The hooks of one pipeline call of ``batch_size`` samples, feeding ``recorder`` (a context manager)."""
        if self.hybrid:  # the shape check across steps holds for a one-UNet (LoRA) hybrid too
            taps = SwitchTaps(self.parts, self.taps, batch_size, attention_tokens=self.n_tokens)
        else:
            taps = ModuleTaps(self.parts[0], self.taps, batch_size, attention_tokens=self.n_tokens)
        recorder.extras = taps.take
        if self.first is None:
            self.first = taps
        return taps

    def step_arrays(self, records) -> tuple:
        """The store's step arrays (``GroupLayout.step_arrays``) of every view, shaped from the first batch's records."""
        import numpy as np

        from trajlab.capture.writer import numpy_dtype

        def step_array(name, dims, shape, dtype, coords, attrs):
            return {"name": name, "dims": tuple(dims), "shape": tuple(shape), "dtype": dtype, "coords": coords,
                    "attrs": attrs}

        out = []
        first = records[0].extra
        for spec in self.taps:
            var = TAP_PREFIX + spec["name"]
            if var not in first:
                raise TapError(f"tap {spec['name']}: the module did not run before the first scheduler step")
            t, info = first[var], self.first.info[var]
            shape = tuple(int(x) for x in t.shape[1:])
            coords = {}
            if spec["channels"] is not None:
                ch = next(d for d in info["dims"] if d.endswith((".channel", ".feature")))
                coords[ch] = ((ch,), np.asarray(spec["channels"], dtype=np.int64))
            if info["branch"] == "both":
                coords["branch"] = (("branch",), np.array(["uncond", "cond"], dtype=object))
            attrs = {"kind": "tap", "module": spec["name"], "module_class": info["class"], "reduce": spec["reduce"],
                     "channels": "all" if spec["channels"] is None else ",".join(map(str, spec["channels"])),
                     "storage": spec["dtype"], "branch": info["branch"]}
            out.append(step_array(var, info["dims"], shape, str(numpy_dtype(t.dtype)), coords, attrs))
        if self.n_tokens:
            if ATTENTION_VARIABLE not in first:
                raise TapError("no cross-attention layer ran before the first scheduler step")
            t = first[ATTENTION_VARIABLE]
            layers = list(cross_attention_layers(self.parts[0]))
            coords = {"token_text": (("prompt", "token"), np.array(self.token_text, dtype=object))}
            attrs = {"kind": "attention", "layers": ",".join(layers), "n_layers": len(layers), "branch": "cond",
                     "aggregation": "softmax(QK^T scale) recomputed from to_q/to_k; mean over heads; bilinear upsampling "
                                    "to the latent grid; mean over layers (DAAM's aggregation, normalised by the "
                                    "number of heads x layers)"}
            out.append(step_array(ATTENTION_VARIABLE, ("token", "y", "x"), tuple(int(x) for x in t.shape[1:]),
                                  ATTENTION_DTYPE, coords, attrs))
        return tuple(out)


__all__ = ["CaptureViews", "SwitchTaps", "switch_parts"]
