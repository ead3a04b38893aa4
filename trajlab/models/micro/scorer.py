"""micro-clip: a tiny CLIP-style scorer trained contrastively on (digit image, prompt) pairs.

It is an ordinary open_clip ``CLIP`` built from a registered model config (``micro-clip.json``)
and loaded through open_clip's own path (``add_model_config`` + ``pretrained=<file>``). Its text
tower, converted to a ``transformers.CLIPTextModel``, is the frozen text encoder of micro-sd,
as OpenAI's CLIP text tower is Stable Diffusion's.

Images enter the model preprocessed as open_clip does: [0, 1] RGB, normalised with OpenAI's
mean/std (``OPENAI_MEAN``/``OPENAI_STD``), 32x32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import trajlab.models.micro.data as D
from .teacher import fit, one_cycle

MODEL_NAME = "micro-clip"
WEIGHTS_FILE = "open_clip_model.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_config(directory: str | Path) -> Path:
    """Write ``micro-clip.json`` (the open_clip model config) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{MODEL_NAME}.json"
    path.write_text(json.dumps(CONFIG, indent=2))
    return path


def build_clip(seed: int = 0):
    """A randomly initialised micro-clip open_clip model (registers the config from a temp dir)."""
    import tempfile

    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        write_config(tmp)
        open_clip.add_model_config(tmp)
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    keep = torch.zeros(CONFIG["text_cfg"]["vocab_size"], dtype=torch.bool)
    keep[tokenize(D.all_prompt_texts()).unique()] = True
    with torch.no_grad():  # tokens never seen in training stay exactly zero (Adam leaves them there)
        model.token_embedding.weight[~keep] = 0
    return model


def to_clip_input(x: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] -> the scorer's normalised input (what ``preprocess`` gives)."""
    mean = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's own tokenizer (zero-padded ids, (N, context_length) int64)."""
    import open_clip

    return open_clip.tokenize(texts, context_length=context_length)


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every (image, text) pair of the same digit is a positive.

    img, txt: (B, E) unit embeddings; labels: (B,) digits. Soft targets spread over positives.
    """
    logits = logit_scale * img @ txt.T
    pos = (labels[:, None] == labels[None, :]).float()
    tgt_i = pos / pos.sum(1, keepdim=True)
    tgt_t = pos.T / pos.T.sum(1, keepdim=True)
    li = -(tgt_i * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(tgt_t * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (li + lt) / 2


def train_clip(model, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 128, lr: float = 2e-3, seed: int = 0, log=None, device: str = "cpu") -> list[float]:
    """Train ``model`` in place on images x (N, 3, 32, 32) in [-1, 1] with labels y; returns losses.

    Each step draws a batch, augments it, and pairs each image with a random paraphrase.
    """
    g = torch.Generator().manual_seed(seed)
    texts = [D.prompt_variants(d) for d in range(10)]
    tokens = tokenize([t for d in texts for t in d]).view(10, len(texts[0]), -1)  # (digit, paraphrase, 77)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.1)
    model.to(device).train()

    def step_loss(_step):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        xb = D.augment(x[idx], g).to(device)
        pick = torch.randint(0, tokens.shape[1], (batch,), generator=g)
        img = model.encode_image(to_clip_input(xb), normalize=True)
        txt = model.encode_text(tokens[y[idx], pick].to(device), normalize=True)
        return multi_positive_clip_loss(img, txt, y[idx].to(device), model.logit_scale.exp().clamp(max=100))

    losses = fit(step_loss, opt, sched, steps, name="clip", log=log, every=50)
    model.cpu().eval()
    return losses


@torch.no_grad()
def zero_shot_logits(model, x: torch.Tensor, prompts=D.PROMPTS) -> torch.Tensor:
    """(N, len(prompts)) cosine logits x 100 of images (N, 3, 32, 32) in [-1, 1] against ``prompts``."""
    img = model.encode_image(to_clip_input(x), normalize=True)
    txt = model.encode_text(tokenize(list(prompts)), normalize=True)
    return 100 * img @ txt.T


def save_clip(model, directory: str | Path, dtype=torch.float16) -> Path:
    """Write the config JSON and the weights (``open_clip_model.safetensors``) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    write_config(directory)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    sd.update({k: v.detach().contiguous() for k, v in model.state_dict().items() if not v.is_floating_point()})
    save_file(sd, str(directory / WEIGHTS_FILE))
    return directory


def load_clip(directory: str | Path, device: str = "cpu"):
    """(model, preprocess, tokenizer) through open_clip's own loading path, fp32, eval mode."""
    import open_clip

    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"micro-clip weights missing: {directory / WEIGHTS_FILE} (run python -m trajlab.models.micro.train)")
    open_clip.add_model_config(str(directory))
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(directory / WEIGHTS_FILE), device=device)
    model = model.float().eval()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    return model, preprocess, tokenizer


def text_encoder_from_clip(model):
    """The open_clip text tower as a ``transformers.CLIPTextModel`` (same last hidden states, fp32)."""
    return text_encoder_from_state_dict(model.state_dict())


def text_encoder_from_file(directory: str | Path):
    """``text_encoder_from_state_dict`` of the saved micro-clip weights (no open_clip import needed)."""
    from safetensors.torch import load_file

    return text_encoder_from_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))


def text_encoder_from_state_dict(src: dict, text_cfg: dict | None = None, embed_dim: int | None = None):
    """open_clip CLIP state dict -> ``transformers.CLIPTextModel`` with the text tower's weights (fp32).

    open_clip's fused ``in_proj`` is split into q/k/v; GELU (exact) and LayerNorm eps 1e-5 match.
    ``text_cfg`` / ``embed_dim``: another open_clip text config (default micro-clip's).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    tc = CONFIG["text_cfg"] if text_cfg is None else text_cfg
    cfg = CLIPTextConfig(
        vocab_size=tc["vocab_size"], hidden_size=tc["width"], intermediate_size=4 * tc["width"],
        num_hidden_layers=tc["layers"], num_attention_heads=tc["heads"], max_position_embeddings=tc["context_length"],
        hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=CONFIG["embed_dim"] if embed_dim is None else embed_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    te = CLIPTextModel(cfg)
    w = tc["width"]
    sd = {
        "text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
        "text_model.final_layer_norm.weight": src["ln_final.weight"],
        "text_model.final_layer_norm.bias": src["ln_final.bias"],
    }
    for i in range(tc["layers"]):
        p, q = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        wq, wk, wv = src[p + "attn.in_proj_weight"].split(w, 0)
        bq, bk, bv = src[p + "attn.in_proj_bias"].split(w, 0)
        sd.update({
            q + "self_attn.q_proj.weight": wq, q + "self_attn.q_proj.bias": bq,
            q + "self_attn.k_proj.weight": wk, q + "self_attn.k_proj.bias": bk,
            q + "self_attn.v_proj.weight": wv, q + "self_attn.v_proj.bias": bv,
            q + "self_attn.out_proj.weight": src[p + "attn.out_proj.weight"], q + "self_attn.out_proj.bias": src[p + "attn.out_proj.bias"],
            q + "layer_norm1.weight": src[p + "ln_1.weight"], q + "layer_norm1.bias": src[p + "ln_1.bias"],
            q + "layer_norm2.weight": src[p + "ln_2.weight"], q + "layer_norm2.bias": src[p + "ln_2.bias"],
            q + "mlp.fc1.weight": src[p + "mlp.c_fc.weight"], q + "mlp.fc1.bias": src[p + "mlp.c_fc.bias"],
            q + "mlp.fc2.weight": src[p + "mlp.c_proj.weight"], q + "mlp.fc2.bias": src[p + "mlp.c_proj.bias"],
        })
    prefix = "text_model." if any(k.startswith("text_model.") for k in te.state_dict()) else ""
    sd = {prefix + k[len("text_model."):]: v.float() for k, v in sd.items()}
    missing, unexpected = te.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "position_ids" not in m]
    if missing or unexpected:
        raise RuntimeError(f"text_encoder_from_clip: missing {missing}, unexpected {unexpected}")
    return te.eval()
