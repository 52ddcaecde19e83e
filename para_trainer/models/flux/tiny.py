"""`builtin:tiny-flux`: a randomly initialised FLUX.1 pipeline small enough for a CPU.

It is a real diffusers `FluxPipeline` with FLUX.1-dev's block types and module names (a
`FluxTransformer2DModel` with double-stream and single-stream blocks, a guidance embedding, RoPE over
(t, h, w) axes; CLIP-L and T5 text encoders; a 16-channel `AutoencoderKL` with FLUX's scaling and shift
factors; the flow-matching Euler scheduler with FLUX's dynamic shift) at widths of 16-64. Every sd-scripts
FLUX key (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, `lora_te1_...`)
finds the same kind of layer in it as in the real model. Weights are seeded; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
from transformers.utils import logging as transformers_logging

from ..tiny_tokenizer import CAPTION_WORDS, TOKENIZER_DIR

_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()  # diffusers' pipeline imports make transformers 5 warn about torchvision
try:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
finally:
    transformers_logging.set_verbosity(_verbosity)

CONFIG_DIR = Path(__file__).resolve().parent / "tiny_configs"
T5_MAX_LENGTH = 32  # sd-scripts' --t5xxl_max_token_length is 256 for schnell, 512 for dev; tiny prompts need less


def read_config(component: str) -> dict:
    return json.loads((CONFIG_DIR / f"{component}.json").read_text())


def t5_tokenizer() -> T5Tokenizer:
    """A unigram tokenizer with T5's special tokens (<pad> 0, </s> 1, <unk> 2) over the caption words.

    Every caption word is one token; other text falls back to single characters (a few punctuation marks and
    digits included), so any ASCII prompt encodes.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + word, -1.0) for word in CAPTION_WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.:;!?'\"-()"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_tiny_flux(seed: int = 0, torch_dtype=torch.float32) -> FluxPipeline:
    """The tiny FLUX pipeline, weights determined by `seed`; the global RNG state is left untouched."""
    builders = {
        "transformer": lambda c: FluxTransformer2DModel.from_config(c),
        "vae": lambda c: AutoencoderKL.from_config(c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        "text_encoder_2": lambda c: T5EncoderModel(T5Config(**c)),
    }
    components = {}
    for index, (name, build) in enumerate(builders.items()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 16 + index)
            model = build(read_config(name)).eval()
        components[name] = torch.nn.Module.to(model, dtype=torch_dtype)
    components["tokenizer"] = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="<|endoftext|>")
    components["tokenizer_2"] = t5_tokenizer()
    components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(read_config("scheduler"))
    pipeline = FluxPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_tiny_flux(directory, seed: int = 0) -> Path:
    """`build_tiny_flux(seed)` as a diffusers folder (safetensors) that `FluxPipeline.from_pretrained` loads."""
    from ..tiny import save_pretrained_quietly

    return save_pretrained_quietly(build_tiny_flux(seed), directory)
