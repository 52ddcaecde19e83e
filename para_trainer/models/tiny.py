"""Tiny, randomly initialised Stable Diffusion 1.x / 2.x (v-prediction) / SDXL pipelines.

They exist for tests and smoke runs: each is a real diffusers pipeline built from the JSON
configs in ``tiny_configs/`` (plus the project-generated tokenizer in ``tiny_configs/tokenizer``)
with the real models' block types, module names and layer kinds (SD1's Conv2d ``proj_in``,
SD2/SDXL's Linear one, conv shortcuts where the real channel count changes, SDXL's text_time
embedding and two text encoders) but widths of 16-128 and fewer layers, so adapters written
for the real models (sd-scripts keys such as
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` or
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``) find the same modules in them as in
the real models loaded with the same diffusers/transformers versions (note that transformers 5's
``CLIPTextModel`` has no ``text_model`` level; ``CLIPTextModelWithProjection`` still has).
A 64x64 image (8x8 latent) takes milliseconds on a CPU. Weights are seeded, so builds are
reproducible; nothing is downloaded.

``real_unet_config`` / ``real_text_encoder_config`` give the full-size models' configs, for
building them on the meta device to count parameters or list module names without memory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as transformers_logging

# diffusers' SD pipeline modules import CLIPImageProcessor, which makes transformers 5 warn at
# import when torchvision is missing; the tiny pipelines have no image processor, so hush it.
_transformers_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()
try:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
finally:
    transformers_logging.set_verbosity(_transformers_verbosity)

from .tiny_tokenizer import TOKENIZER_DIR

KINDS = ("sd1", "sd2", "sdxl")

CONFIG_DIR = Path(__file__).resolve().parent / "tiny_configs"

# Pad token of each text encoder's tokenizer, as in the real models: SD1 and SDXL's CLIP-L
# tokenizer pad with <|endoftext|>, the OpenCLIP ones (SD2, SDXL tokenizer_2) with "!".
TOKENIZER_PAD_TOKENS = {
    "sd1": ("<|endoftext|>",),
    "sd2": ("!",),
    "sdxl": ("<|endoftext|>", "!"),
}

_TEXT_ENCODER_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


def read_tiny_config(kind: str, component: str) -> dict:
    """The JSON config of one component ("unet", "vae", "text_encoder", ...) of a tiny model."""
    _check_kind(kind)
    return json.loads((CONFIG_DIR / kind / f"{component}.json").read_text())


def build_tiny_pipeline(kind: str, seed: int = 0, torch_dtype=torch.float32):
    """A tiny pipeline of the given kind (see ``KINDS``) with weights determined by ``seed``.

    Returns a ``StableDiffusionPipeline`` (sd1, sd2; no safety checker) or a
    ``StableDiffusionXLPipeline`` (sdxl). The global torch RNG state is left untouched.
    """
    _check_kind(kind)
    n_text_encoders = len(TOKENIZER_PAD_TOKENS[kind])
    text_encoder_names = ["text_encoder", "text_encoder_2"][:n_text_encoders]
    components = {}
    # Each model gets its own seed stream, so its weights do not depend on the build order.
    for index, name in enumerate(["unet", "vae", *text_encoder_names]):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 16 + index)
            model = _build_model(read_tiny_config(kind, name)).eval()  # as from_pretrained returns it
        # nn.Module.to, not diffusers' ModelMixin.to: the latter warns about "modules that should
        # be kept in float32: []" on every dtype cast, although these models have none.
        components[name] = torch.nn.Module.to(model, dtype=torch_dtype)
    for name, pad_token in zip(["tokenizer", "tokenizer_2"], TOKENIZER_PAD_TOKENS[kind]):
        components[name] = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad_token)
    components["scheduler"] = DDIMScheduler.from_config(read_tiny_config(kind, "scheduler"))

    if kind == "sdxl":
        pipeline = StableDiffusionXLPipeline(**components)
    else:
        pipeline = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_tiny_pipeline(kind: str, directory, seed: int = 0) -> Path:
    """Write ``build_tiny_pipeline(kind, seed)`` as a diffusers folder (safetensors); return its path.

    Load it back with ``StableDiffusionPipeline.from_pretrained`` (sd1, sd2) or
    ``StableDiffusionXLPipeline.from_pretrained`` (sdxl); this needs no network.
    """
    return save_pretrained_quietly(build_tiny_pipeline(kind, seed), directory)


def save_pretrained_quietly(pipeline, directory) -> Path:
    """pipeline.save_pretrained (safetensors) without transformers 5's "Writing model shards" bar per text
    encoder; returns the folder."""
    directory = Path(directory)
    progress_bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        pipeline.save_pretrained(directory, safe_serialization=True)
    finally:
        if progress_bars_were_enabled:
            transformers_logging.enable_progress_bar()
    return directory


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def _build_model(config: dict) -> torch.nn.Module:
    class_name = config.get("_class_name") or config["architectures"][0]
    if class_name == "UNet2DConditionModel":
        return UNet2DConditionModel.from_config(config)
    if class_name == "AutoencoderKL":
        return AutoencoderKL.from_config(config)
    return _TEXT_ENCODER_CLASSES[class_name](CLIPTextConfig(**config))


# ---------------------------------------------------------------------------------------------
# Full-size configs (SD1.5, SD2.1-768-v, SDXL base 1.0), for meta-device construction.

_SD_UNET_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
}
_REAL_UNET_CONFIGS = {
    "sd1": {**_SD_UNET_BLOCKS, "sample_size": 64, "attention_head_dim": 8, "cross_attention_dim": 768},
    "sd2": {
        **_SD_UNET_BLOCKS,
        "sample_size": 96,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    "sdxl": {
        "sample_size": 128,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 1280 (pooled bigG) + 6 * 256 (size/crop ids)
    },
}
_COMMON_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
}

_CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_OPENCLIP_H = {  # SD2 uses the penultimate of OpenCLIP-H's 24 layers, so the checkpoint has 23
    "architectures": ["CLIPTextModel"],
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
_OPENCLIP_BIGG = {
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
_COMMON_TEXT_CONFIG = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
_REAL_TEXT_ENCODER_CONFIGS = {"sd1": [_CLIP_L], "sd2": [_OPENCLIP_H], "sdxl": [_CLIP_L, _OPENCLIP_BIGG]}


def real_unet_config(kind: str) -> dict:
    """``UNet2DConditionModel`` kwargs of the real SD1.5 / SD2.1 (768-v) / SDXL-base UNet.

    Build it without memory: ``with torch.device("meta"): UNet2DConditionModel(**cfg)``.
    """
    _check_kind(kind)
    return copy.deepcopy({**_COMMON_UNET_CONFIG, **_REAL_UNET_CONFIGS[kind]})


def real_text_encoder_config(kind: str) -> list[dict]:
    """``CLIPTextConfig`` kwargs of each real text encoder, in pipeline order.

    ``architectures[0]`` names the model class (``CLIPTextModel`` or
    ``CLIPTextModelWithProjection`` for SDXL's second encoder).
    """
    _check_kind(kind)
    return [copy.deepcopy({**_COMMON_TEXT_CONFIG, **config}) for config in _REAL_TEXT_ENCODER_CONFIGS[kind]]


def build_real_text_encoder_on_meta(config: dict) -> torch.nn.Module:
    """A full-size text encoder from ``real_text_encoder_config`` on the meta device (no memory)."""
    with torch.device("meta"):
        return _TEXT_ENCODER_CLASSES[config["architectures"][0]](CLIPTextConfig(**config))


def build_real_unet_on_meta(kind: str) -> UNet2DConditionModel:
    """The full-size UNet of ``kind`` on the meta device (no memory), e.g. to list module names."""
    with torch.device("meta"):
        return UNet2DConditionModel(**real_unet_config(kind))
