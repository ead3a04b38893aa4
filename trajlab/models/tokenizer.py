"""The real CLIP BPE tokenizer, rebuilt offline from the vocabulary file open_clip ships.

Stable Diffusion's tokenizer (openai/clip-vit-large-patch14) is the CLIP BPE with 49408 tokens.
open_clip bundles its merges as ``bpe_simple_vocab_16e6.txt.gz``; the vocabulary is derived
exactly as CLIP does (byte-to-unicode order, then ``</w>`` variants, then merges, then the two
special tokens), so ids match open_clip's and the hub tokenizer's.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # lines[1:48895] of the merges file


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_file() -> Path:
    """Path of open_clip's bundled BPE merges file."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"open_clip's BPE file is missing: {path} (reinstall open_clip_torch)")
    return path


def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and its merge list."""
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer_files(directory: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (CLIPTokenizer's files) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


@functools.lru_cache(maxsize=1)
def _cached_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    vocab, merges = vocab_and_merges()
    return vocab, tuple(merges)


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A ``transformers.CLIPTokenizer`` equal to SD's, built without any download.

    ``pad_token`` is ``<|endoftext|>`` for SD1.5's tokenizer and ``"!"`` for SDXL's second one.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _cached_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=model_max_length, pad_token=pad_token)
