"""Builders for the real path at cut depth: a local tokenizer with R-4B's special tokens at
Qwen3's ids and a Qwen3-style chat template, a random R-4B-shaped checkpoint saved by
transformers (Qwen3 text + SigLIP vision + LLaVA-OneVision projector and ``image_newline``) at
r4b-4b's widths, and a Parquet file of real-size images.  Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# Qwen3's special-token ids; R-4B adds <image> after them.
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<think>": 151667, "</think>": 151668, "<image>": 151669}
VOCAB = 151936  # Qwen3-4B's embedding rows (the tokenizer has 151670 ids)

#: A Qwen3-style chat template: turns in ChatML, ``enable_thinking=False`` opens and closes an
#: empty think block.  ``thinking_mode`` variant: R-4B's three-way switch.
CHAT_TEMPLATES = {
    "enable_thinking": (
        "{%- for m in messages -%}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|im_start|>assistant\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false -%}"
        "{{ '<think>\n\n</think>\n\n' }}"
        "{%- endif -%}"
        "{%- endif -%}"),
    "thinking_mode": (
        "{%- for m in messages -%}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|im_start|>assistant\n' }}"
        "{%- if thinking_mode is defined and thinking_mode == 'long' -%}{{ '<think>\n' }}"
        "{%- elif thinking_mode is defined and thinking_mode == 'short' -%}"
        "{{ '<think>\n\n</think>\n\n' }}"
        "{%- else -%}{{ '<think>' }}{%- endif -%}"
        "{%- endif -%}"),
}


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte (what byte-level BPE vocabularies hold)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def make_tokenizer(path: Path, *, mode_argument: str = "enable_thinking") -> Path:
    """A byte-level BPE tokenizer with Qwen3's special ids (vocabulary 151670), "\\n\\n" one
    token, and a chat template; saved with transformers to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    nl = alphabet[ord("\n")]
    merges = [(nl, nl)]
    vocab[nl + nl] = len(vocab)
    first_special = min(SPECIALS.values())
    while len(vocab) < first_special:  # unreachable fillers up to Qwen3's special range
        vocab[f"<|filler_{len(vocab)}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    order = sorted(SPECIALS.items(), key=lambda kv: kv[1])
    pad = [f"<|reserved_special_{i}|>" for i in range(first_special, order[-1][1] + 1)]
    names = {v: k for k, v in SPECIALS.items()}
    specials = [names.get(i, pad[i - first_special]) for i in range(first_special, order[-1][1] + 1)]
    tok.add_special_tokens(specials)
    for name, want in SPECIALS.items():
        got = tok.token_to_id(name)
        assert got == want, (name, got, want)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATES[mode_argument]
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return path


def make_checkpoint(path: Path, *, layers: int = 2, vision_layers: int = 2, seed: int = 0,
                    original_format: bool = True, widths: str = "real",
                    tied: bool = True) -> Path:
    """A random LLaVA-OneVision checkpoint shaped like R-4B (r4b-4b's widths, ``layers`` +
    ``vision_layers`` deep, tied embeddings unless ``tied=False``, ``image_newline``), saved by
    transformers."""
    import transformers

    if widths == "real":
        text = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128)
        vision = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16)
    else:  # small widths, real vocabulary, tokens and image geometry
        text = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
        vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    tc = transformers.Qwen3Config(vocab_size=VOCAB, num_hidden_layers=layers,
                                  max_position_embeddings=40960, rms_norm_eps=1e-6,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                  tie_word_embeddings=tied, **text)
    vc = transformers.SiglipVisionConfig(num_hidden_layers=vision_layers, patch_size=14,
                                         image_size=384, layer_norm_eps=1e-6,
                                         vision_use_head=False, **vision)
    cfg = transformers.LlavaOnevisionConfig(text_config=tc, vision_config=vc,
                                            image_token_index=SPECIALS["<image>"],
                                            vision_feature_layer=-1,
                                            vision_feature_select_strategy="full",
                                            vision_aspect_ratio="anyres_max_9",
                                            tie_word_embeddings=tied)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = transformers.LlavaOnevisionForConditionalGeneration(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
    model.tie_weights()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), save_original_format=original_format)
    return path


def write_images_parquet(folder: Path, *, seed: int = 0) -> Path:
    """``data.parquet`` beside PNG files of real sizes: single images of several sizes (one
    grayscale), prompts with two images, and text-only rows; math answers."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def png(name, h, w, gray=False):
        arr = rng.integers(0, 256, size=(h, w) if gray else (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
        return name

    rows = [
        {"question": "What is 3 + 4?", "answer": "7", "reasoning": "3 + 4 = 7",
         "images": [png("a.png", 384, 384)]},
        {"question": "How many sides does a square have?", "answer": "4", "reasoning": None,
         "images": [png("b.png", 200, 300)]},
        {"question": "Compare the two pictures: what is 2 * 6?", "answer": "12",
         "reasoning": "2 * 6 = 12", "images": [png("c.png", 240, 320), png("d.png", 256, 256)]},
        {"question": "What is the square root of 81?", "answer": "9", "reasoning": "9 * 9 = 81",
         "images": [png("e.png", 300, 200, gray=True)]},
        {"question": "What is 10 - 3?", "answer": "7", "reasoning": "10 - 3 = 7", "images": []},
        {"question": "What is 5 * 5?", "answer": "25", "reasoning": "5 * 5 = 25",
         "images": [png("f.png", 150, 200)]},
        {"question": "Which is larger, 1/2 or 1/3?", "answer": "1/2",
         "reasoning": "1/2 = 0.5 > 0.333 = 1/3",
         "images": [png("g.png", 200, 150), png("h.png", 128, 96)]},
        {"question": "What is 6 + 6?", "answer": "12", "reasoning": None, "images": []},
    ]
    table = pa.table({
        "id": [f"row{i}" for i in range(len(rows))],
        "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
        "reasoning": [r["reasoning"] for r in rows], "images": [r["images"] for r in rows]})
    out = folder / "data.parquet"
    pq.write_table(table, out)
    return out


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
