"""The shapes world's judge: a small CNN attribute reader (scores of its readings: ``scores``).

The CNN reads a 32x32 RGB image into: object count (1 or 2), the axis of two objects (horizontal:
side by side, vertical: one above the other) and, per object slot in canonical order (left-to-right,
then top-to-bottom; ``world.canonical_order``), shape, colour, size, texture and position (3x3 grid
cell). It trains on generator images drawn from *uniform* priors (so it carries no prior of its own
into the histograms it scores), perturbed (``augment``: noise, gain, colour cast, blur with the
texture target dropped on blurred images).

Train (CPU, one thread, fixed seed): ``python -m trajlab.worlds.shapes.judge --out data/worlds/shapes``
writes ``judge.safetensors`` and ``judge.json`` (held-out accuracy tables, robustness table, training
time, machine). ``load_judge()`` loads the shipped one; ``Judge.read(images)`` gives readings.

The scores (``alignment``, ``composition``, ``fine_detail``, ``leftout_histograms``,
``rare_colour_share``, ``tv_distance``, ``score``) live in ``trajlab.worlds.shapes.scores`` and are
re-exported here. Asking for an attribute the world lacks raises a one-line ValueError
(``check_attribute``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import world as W
from .scores import (  # noqa: F401  (the scores are part of the judge's API)
    ATTRIBUTES,
    SCENE_ATTRIBUTES,
    SLOT_ATTRIBUTES,
    alignment,
    check_attribute,
    composition,
    fine_detail,
    histogram,
    leftout_histograms,
    rare_colour_share,
    score,
    tv_distance,
    tv_noise_floor,
    wilson,
)

WEIGHTS_FILE = "judge.safetensors"
META_FILE = "judge.json"
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "data" / "worlds" / "shapes"
TRAIN_COMMAND = "python -m trajlab.worlds.shapes.judge --out data/worlds/shapes"

COUNTS = (1, 2)

# logits layout: count(2) axis(2) then per slot: shape colour size texture position
HEADS = [("count", COUNTS), ("axis", W.AXES)] + [(f"{a}{k}", W.VALUES[a]) for k in range(2) for a in SLOT_ATTRIBUTES]
N_LOGITS = sum(len(v) for _, v in HEADS)


# ----------------------------------------------------------------------------------------------
# the network


def build_judge(seed: int = 0) -> nn.Module:
    """CNN 3x32x32 -> N_LOGITS: conv 24 @32 -> pool, conv 48 @16 -> pool, conv 96 @8 -> pool, then
    1536 -> 192 -> logits (the first 3x3 conv runs at full resolution, before any pooling, so it sees
    the 2 px stripes)."""
    torch.manual_seed(seed)

    def block(i, o, pool):
        layers = [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(
        *block(3, 24, True), *block(24, 48, True), *block(48, 96, True),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(96 * 16, 192), nn.ReLU(inplace=True), nn.Linear(192, N_LOGITS),
    )


def _split(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, vals in HEADS:
        out[name] = logits[:, i:i + len(vals)]
        i += len(vals)
    return out


def targets(scenes: list[dict]) -> dict[str, np.ndarray]:
    """Integer class targets per head (-1 where undefined: axis and slot 1 of one-object scenes)."""
    n = len(scenes)
    t = {name: np.full(n, -1, np.int64) for name, _ in HEADS}
    for i, sc in enumerate(scenes):
        objs = W.canonical_objects(sc)
        t["count"][i] = COUNTS.index(len(objs))
        if len(objs) == 2:
            t["axis"][i] = W.AXES.index(W.scene_axis(sc))
        for k, o in enumerate(objs):
            for a in SLOT_ATTRIBUTES:
                t[f"{a}{k}"][i] = W.VALUES[a].index(o[a])
    return t


def to_input(images) -> torch.Tensor:
    """float (N, 3, 32, 32) in [-1, 1] from uint8 (N, H, W, 3) / (H, W, 3) arrays, float tensors or
    arrays (N, 3, H, W) in [-1, 1], or a list of PIL images; resized (area) when not 32x32."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim == 3:
            images = images[None]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    else:
        x = torch.as_tensor(images).float()
        if x.ndim == 3:
            x = x[None]
    if x.shape[-1] != W.IMAGE_SIZE or x.shape[-2] != W.IMAGE_SIZE:
        x = F.interpolate(x, size=(W.IMAGE_SIZE, W.IMAGE_SIZE), mode="area")
    return x.contiguous()


_BLUR = torch.tensor([0.25, 0.5, 0.25])
_BLUR = (_BLUR[:, None] * _BLUR[None, :]).expand(3, 1, 3, 3).contiguous()


def blur(x: torch.Tensor) -> torch.Tensor:
    """[1 2 1]/4 x [1 2 1]/4 blur per channel (replicate padding)."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _BLUR, groups=3)


def augment(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturb 80% of images: gain +-15%, shift +-0.08, per-channel shift +-0.12, pixel noise sigma up
    to 0.2 (in [-1, 1] units); 25% of them are also blurred by a random fraction of a [1 2 1] blur.
    Returns the images and a mask of the blurred ones (their texture target is dropped, so blur never
    teaches the judge that softened stripes are stripes)."""
    n = x.shape[0]

    def u(*shape):
        return torch.rand(n, *shape, generator=g)

    on = (u(1, 1, 1) < 0.8).float()
    blurred = (u(1, 1, 1) < 0.25).float() * on
    y = x + blurred * u(1, 1, 1) * (blur(x) - x)
    y = y * (1 + (u(1, 1, 1) - 0.5) * 0.3) + (u(1, 1, 1) - 0.5) * 0.16 + (u(3, 1, 1) - 0.5) * 0.24
    y = y + u(1, 1, 1) * 0.2 * torch.randn(x.shape, generator=g)
    return (on * y + (1 - on) * x).clamp(-1, 1), blurred.view(n) > 0


def _loss(logits: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = _split(logits)
    total = 0.0
    for name, _ in HEADS:
        y = t[name]
        mask = y >= 0
        if mask.any():
            total = total + F.cross_entropy(parts[name][mask], y[mask])
    return total


# ----------------------------------------------------------------------------------------------
# reading images


class Judge:
    """``read(images) -> list of readings``; a reading is ``{"count", "axis", "objects": [{shape,
    colour, size, texture, position}, ...] (canonical slots), "confidence"}``."""

    def __init__(self, model: nn.Module, meta: dict | None = None, batch: int = 512):
        self.model = model.eval()
        self.meta = meta or {}
        self.batch = batch

    @torch.no_grad()
    def probabilities(self, images) -> dict[str, np.ndarray]:
        """Softmax probabilities per head (``HEADS`` names), each (N, n_values)."""
        x = to_input(images)
        outs = [self.model(x[i:i + self.batch]) for i in range(0, len(x), self.batch)]
        logits = torch.cat(outs) if outs else torch.zeros(0, N_LOGITS)
        return {k: v.softmax(-1).numpy() for k, v in _split(logits).items()}

    def read(self, images) -> list[dict]:
        probs = self.probabilities(images)
        readings = []
        for i in range(len(probs["count"])):
            count = COUNTS[int(probs["count"][i].argmax())]
            conf = [probs["count"][i].max()]
            objects = []
            for k in range(count):
                o = {}
                for a in SLOT_ATTRIBUTES:
                    p = probs[f"{a}{k}"][i]
                    o[a] = W.VALUES[a][int(p.argmax())]
                    conf.append(p.max())
                objects.append(o)
            axis = None
            if count == 2:
                axis = W.AXES[int(probs["axis"][i].argmax())]
                conf.append(probs["axis"][i].max())
            readings.append({"count": count, "axis": axis, "objects": objects, "confidence": float(min(conf))})
        return readings

    def read_attribute(self, images, attribute: str, slot: int = 0) -> list:
        """One attribute per image (slot attributes from ``slot``; None where the slot is empty)."""
        check_attribute(attribute)
        if attribute == "relation":
            raise ValueError("shapes judge: 'relation' is read against a prompt (composition), not from an image alone; read 'axis'")
        out = []
        for r in self.read(images):
            if attribute in ("count", "axis"):
                out.append(r[attribute])
            else:
                out.append(r["objects"][slot][attribute] if slot < len(r["objects"]) else None)
        return out


def save_judge(model: nn.Module, directory: str | Path, meta: dict) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def load_judge(directory: str | Path | None = None) -> Judge:
    """The shipped judge (default ``data/worlds/shapes``); one-line FileNotFoundError if missing."""
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else DEFAULT_DIR
    path = directory / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"shapes judge weights missing: {path} (train them: {TRAIN_COMMAND})")
    model = build_judge()
    model.load_state_dict(load_file(str(path)))
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return Judge(model.eval(), meta)


# ----------------------------------------------------------------------------------------------
# held-out accuracy


def accuracy_table(judge: Judge, scenes: list[dict], images: np.ndarray | None = None) -> dict:
    """Held-out accuracy per attribute on ``scenes`` (rendered unless ``images`` given): count (all
    scenes), axis (two-object scenes), each slot attribute pooled over filled slots (plus per slot),
    ``scene`` (everything right), and per-colour recall."""
    images = W.render_batch(scenes) if images is None else images
    reads = judge.read(images)
    truth = [W.canonical_objects(s) for s in scenes]
    tab: dict[str, list] = {"count": [], "axis": []}
    per_slot = {f"{a}{k}": [] for k in range(2) for a in SLOT_ATTRIBUTES}
    colour_hits = {c: [] for c in W.COLOURS}
    scene_ok = []
    for sc, objs, r in zip(scenes, truth, reads):
        ok_count = r["count"] == len(objs)
        tab["count"].append(ok_count)
        ok = ok_count
        if len(objs) == 2:
            tab["axis"].append(r["axis"] == W.scene_axis(sc))
            ok = ok and tab["axis"][-1]
        for k, o in enumerate(objs):
            got = r["objects"][k] if k < len(r["objects"]) else None
            for a in SLOT_ATTRIBUTES:
                hit = got is not None and got[a] == o[a]
                per_slot[f"{a}{k}"].append(hit)
                ok = ok and hit
            colour_hits[o["colour"]].append(got is not None and got["colour"] == o["colour"])
        scene_ok.append(ok)
    acc = {k: float(np.mean(v)) for k, v in tab.items() if v}
    for a in SLOT_ATTRIBUTES:
        pooled = per_slot[f"{a}0"] + per_slot[f"{a}1"]
        acc[a] = float(np.mean(pooled))
    acc["scene"] = float(np.mean(scene_ok))
    return {
        "n_scenes": len(scenes),
        "n_objects": len(per_slot["shape0"]) + len(per_slot["shape1"]),
        "accuracy": acc,
        "per_slot": {k: float(np.mean(v)) for k, v in per_slot.items() if v},
        "colour_recall": {c: (float(np.mean(v)) if v else None) for c, v in colour_hits.items()},
        "colour_n": {c: len(v) for c, v in colour_hits.items()},
    }


def noisy(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """uint8 images plus Gaussian pixel noise of ``sigma`` (in 0..255 units), clipped."""
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float32) + rng.normal(0, sigma, images.shape), 0, 255).round().astype(np.uint8)


HELDOUT_SEEDS = {"balanced": 1001, "prior": 1002, "prior_noisy": 1003, "robustness": 1004}


def heldout_tables(judge: Judge, n: int = 2000) -> dict:
    """The held-out tables: balanced (uniform priors), world priors, world priors + noise sigma 8/255."""
    bal = W.sample_scenes(n, HELDOUT_SEEDS["balanced"], priors=W.UNIFORM_PRIORS)
    pri = W.sample_scenes(n, HELDOUT_SEEDS["prior"])
    noi = W.sample_scenes(n, HELDOUT_SEEDS["prior_noisy"])
    return {
        "balanced": accuracy_table(judge, bal),
        "prior": accuracy_table(judge, pri),
        "prior_noisy": accuracy_table(judge, noi, noisy(W.render_batch(noi), 8.0, HELDOUT_SEEDS["prior_noisy"])),
    }


def robustness_tables(judge: Judge, n: int = 1000) -> dict:
    """Accuracy under perturbations a sampler's output may carry (informative, not targets): pixel
    noise sigma 16 and 24 (/255), a per-image colour cast (sigma 12/255 per channel), a [1 2 1] blur
    (which softens the stripes, so texture may rightly fall there)."""
    scenes = W.sample_scenes(n, HELDOUT_SEEDS["robustness"])
    images = W.render_batch(scenes)
    rng = np.random.default_rng(HELDOUT_SEEDS["robustness"])
    cast = np.clip(images + rng.normal(0, 12.0, (n, 1, 1, 3)), 0, 255).round().astype(np.uint8)
    blurred = blur(to_input(images))
    perturbed = {
        "noise16": noisy(images, 16.0, 1),
        "noise24": noisy(images, 24.0, 2),
        "colour_cast12": cast,
        "blur121": ((blurred + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy(),
    }
    return {name: accuracy_table(judge, scenes, imgs)["accuracy"] for name, imgs in perturbed.items()}


# ----------------------------------------------------------------------------------------------
# training


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"


def train(out: str | Path, *, seed: int = 0, steps: int = 1200, batch: int = 128, train_scenes: int = 30000,
          lr: float = 3e-3, threads: int = 1, heldout: int = 2000, log=print) -> dict:
    """Train the judge from ``seed`` on uniform-prior generator images; write weights + table to ``out``."""
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    scenes = W.sample_scenes(train_scenes, seed, priors=W.UNIFORM_PRIORS)
    x_all = to_input(W.render_batch(scenes))
    y_all = {k: torch.from_numpy(v) for k, v in targets(scenes).items()}
    t_data = time.perf_counter() - t0
    log(f"judge: {train_scenes} training scenes rendered in {t_data:.1f} s")

    model = build_judge(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, train_scenes, (batch,), generator=g)
        x, blurred = augment(x_all[idx], g)
        t = {k: v[idx] for k, v in y_all.items()}
        for k in ("texture0", "texture1"):
            t[k] = t[k].masked_fill(blurred, -1)
        loss = _loss(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"judge step {step} loss {np.mean(losses[-100:]):.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
    judge = Judge(model)
    t1 = time.perf_counter()
    tables = heldout_tables(judge, heldout)
    robust = robustness_tables(judge, max(200, heldout // 2))
    t_eval = time.perf_counter() - t1
    meta = {
        "world": "shapes",
        "input": "uint8 (N,32,32,3) or float (N,3,32,32) in [-1,1]",
        "heads": {name: list(map(str, vals)) for name, vals in HEADS},
        "slot_order": "canonical: left-to-right, then top-to-bottom by grid cell",
        "architecture": "conv3x3-BN-ReLU-maxpool 24@32, 48@16, 96@8; linear 1536-192-%d" % N_LOGITS,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "heldout": tables,
        "heldout_seeds": HELDOUT_SEEDS,
        "robustness": robust,
        "robustness_note": " ".join(robustness_tables.__doc__.split()),
        "training": {
            "command": TRAIN_COMMAND,
            "seed": seed, "steps": steps, "batch": batch, "train_scenes": train_scenes, "train_priors": "uniform",
            "lr": lr, "optimiser": "AdamW wd 1e-4, one-cycle", "augment": " ".join(augment.__doc__.split("Returns")[0].split()),
            "threads": threads, "torch": torch.__version__, "machine": _machine(),
            "wall_seconds": round(t_train, 1), "cpu_seconds": round(c_train, 1), "data_seconds": round(t_data, 1),
            "heldout_eval_seconds": round(t_eval, 1), "final_loss": float(np.mean(losses[-100:])),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }
    save_judge(model, out, meta)
    log(f"judge: trained in {t_train:.0f} s wall ({c_train:.0f} s CPU) on {threads} thread(s); written to {out}")
    for name, tab in tables.items():
        log(f"  held-out {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in tab["accuracy"].items()))
    for name, acc in robust.items():
        log(f"  robustness {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m trajlab.worlds.shapes.judge", description="Train the shapes-world judge (CPU, fixed seed).")
    ap.add_argument("--out", default="data/worlds/shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--train-scenes", type=int, default=30000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout", type=int, default=2000)
    a = ap.parse_args(argv)
    train(a.out, seed=a.seed, steps=a.steps, batch=a.batch, train_scenes=a.train_scenes, threads=a.threads, heldout=a.heldout)


if __name__ == "__main__":
    main()
