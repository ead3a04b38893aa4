"""shapes-clip: a small CLIP (open_clip ``CLIP``) trained contrastively on (scene image, caption) pairs.

Its text tower, converted to a ``transformers.CLIPTextModel``, is shapes-sd's frozen text encoder (as
OpenAI's CLIP text tower is Stable Diffusion's); the tokenizer is the real CLIP BPE
(``trajlab.models.tokenizer``) with a context of ``CONTEXT`` tokens (the grammar's longest prompt is 17).
Token embeddings of words the grammar never uses start at zero and stay there (AdamW, no weight decay).

Training pairs: scenes from the world's priors, each with a caption from ``world.caption`` (attributes left
out at the grammar's rates for half of the batch, everything stated for the other half). The loss is the
symmetric InfoNCE of micro-clip (``multi_positive_clip_loss``) with identical caption strings counted as
positives. Saved as an open_clip model config + weights and loaded through open_clip's own path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trajlab.models.micro.scorer import multi_positive_clip_loss, text_encoder_from_state_dict, to_clip_input
from trajlab.models.micro.teacher import fit, one_cycle

from . import world as W

MODEL_NAME = "shapes-clip"
WEIGHTS_FILE = "open_clip_model.safetensors"
CONTEXT = 32
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def grammar_words() -> list[str]:
    """Every word the grammar can produce (the tokens the text tower is trained on)."""
    return list(W._VOCAB)


def write_config(directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{MODEL_NAME}.json"
    path.write_text(json.dumps(CONFIG, indent=2))
    return path


def tokenize(texts: list[str]) -> torch.Tensor:
    """open_clip's tokenizer at ``CONTEXT`` tokens (zero padded)."""
    import open_clip

    return open_clip.tokenize(texts, context_length=CONTEXT)


def build_clip(seed: int = 0):
    """A randomly initialised shapes-clip; rows of the token embedding outside the grammar set to zero."""
    import tempfile

    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        write_config(tmp)
        open_clip.add_model_config(tmp)
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    keep = torch.zeros(CONFIG["text_cfg"]["vocab_size"], dtype=torch.bool)
    keep[tokenize(grammar_words() + [""]).unique()] = True
    with torch.no_grad():
        model.token_embedding.weight[~keep] = 0
    return model


def caption_batch(scenes: list[dict], rng: np.random.Generator) -> list[str]:
    """A caption per scene: attributes left out at the grammar's rates for even rows, all stated for odd rows."""
    return [W.caption(s, rng if i % 2 == 0 else None) for i, s in enumerate(scenes)]


def train_clip(model, images: torch.Tensor, scenes: list[dict], steps: int, batch: int = 128, lr: float = 2e-3,
               seed: int = 0, log=None) -> list[float]:
    """Train in place on ``images`` (N, 3, 32, 32) in [-1, 1] of ``scenes``; returns per-step losses."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.1)
    model.train()

    def step_loss(_step):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        texts = caption_batch([scenes[int(i)] for i in idx], rng)
        labels = torch.as_tensor(np.unique(texts, return_inverse=True)[1].reshape(-1))
        img = model.encode_image(to_clip_input(images[idx]), normalize=True)
        txt = model.encode_text(tokenize(texts), normalize=True)
        return multi_positive_clip_loss(img, txt, labels, model.logit_scale.exp().clamp(max=100))

    losses = fit(step_loss, opt, sched, steps, name="clip", log=log, every=50)
    model.eval()
    return losses


@torch.no_grad()
def retrieval_accuracy(model, images: torch.Tensor, scenes: list[dict]) -> dict:
    """Zero-shot attribute reading by the CLIP on single-object images: for each attribute, the fraction whose
    best-scoring one-word-changed caption is the true one (the other attributes stated)."""
    out = {}
    singles = [(x, s) for x, s in zip(images, scenes) if len(s["objects"]) == 1]
    if not singles:
        return out
    x = torch.stack([a for a, _ in singles])
    img = model.encode_image(to_clip_input(x), normalize=True)
    for attr in ("shape", "colour", "size", "texture", "position"):
        hits = []
        for i, (_, s) in enumerate(singles):
            o = s["objects"][0]
            texts = [W.format_prompt({"objects": [{**o, attr: v}]}) for v in W.VALUES[attr]]
            txt = model.encode_text(tokenize(texts), normalize=True)
            hits.append(int((img[i] @ txt.T).argmax()) == W.VALUES[attr].index(o[attr]))
        out[attr] = float(np.mean(hits))
    return out


def save_clip(model, directory: str | Path) -> Path:
    """Config JSON + fp16 weights (``open_clip_model.safetensors``) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    write_config(directory)
    sd = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(directory / WEIGHTS_FILE))
    return directory


def load_clip(directory: str | Path, device: str = "cpu"):
    """(model, preprocess, tokenizer) through open_clip's loading path, fp32, eval mode."""
    import open_clip

    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"shapes-clip weights missing: {directory / WEIGHTS_FILE} (run python -m trajlab.worlds.shapes.train)")
    open_clip.add_model_config(str(directory))
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(directory / WEIGHTS_FILE), device=device)
    return model.float().eval(), preprocess, open_clip.get_tokenizer(MODEL_NAME)


def text_encoder_from_file(directory: str | Path):
    """The saved text tower as a ``transformers.CLIPTextModel`` (fp32)."""
    from safetensors.torch import load_file

    src = load_file(str(Path(directory) / WEIGHTS_FILE))
    return text_encoder_from_state_dict(src, text_cfg=CONFIG["text_cfg"], embed_dim=CONFIG["embed_dim"])
