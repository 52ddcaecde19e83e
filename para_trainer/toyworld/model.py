"""``builtin:toy-sd1``: an SD1-architecture text-to-image model pretrained on the toy world.

The model is a diffusers folder shipped in the package (``toy-sd1/``: fp16 safetensors, configs, tokenizer,
scheduler), loadable with ``StableDiffusionPipeline.from_pretrained`` as it is. Its architecture is SD 1.5's:
the same UNet block types, layer counts and module names (so sd-scripts' ``lora_unet_…`` / ``lora_te_…`` keys
are SD 1.5's), the same scheduler config and epsilon prediction; only the widths, the image size (64 px) and the
VAE depth (4x instead of 8x down, so latents are 16 x 16) are small. Its tokenizer is the project's tiny CLIP
BPE with the world's words as single tokens.

The configs below are the recipe's; ``pretrain.py`` builds the models from them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..models.tiny_tokenizer import CAPTION_WORDS, tokenizer_files
from .world import vocabulary

TOY_DIR = Path(__file__).resolve().parent / "toy-sd1"
IMAGE_SIZE = 64


def tokenizer_words() -> list[str]:
    return list(dict.fromkeys(CAPTION_WORDS + vocabulary()))


def toy_tokenizer_files() -> dict[str, str]:
    return tokenizer_files(tokenizer_words())


def _vocab_size() -> int:
    return len(json.loads(toy_tokenizer_files()["vocab.json"]))


UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 16,
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 128, 128],
    "attention_head_dim": 2,  # diffusers' legacy name: the number of heads, as SD 1.5's 8
    "cross_attention_dim": 128,
    "use_linear_projection": False,
}

VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 1.0,  # set from the trained encoder's latents (pretrain.py, stage "latents")
}


def text_encoder_config() -> dict:
    vocab = _vocab_size()
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": 128,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
    }


SCHEDULER_CONFIG = {  # SD 1.5's
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


def new_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(copy.deepcopy(UNET_CONFIG))


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(copy.deepcopy(VAE_CONFIG))


def new_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = text_encoder_config()
    config.pop("architectures")
    config.pop("model_type")
    return CLIPTextModel(CLIPTextConfig(**config))


def write_tokenizer(directory) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in toy_tokenizer_files().items():
        (directory / name).write_bytes(text.encode("utf-8"))
    return directory


def load_tokenizer(directory=None):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(Path(directory or TOY_DIR) / "tokenizer")


def is_available(directory=TOY_DIR) -> bool:
    return (Path(directory) / "model_index.json").is_file()


def load_toy_pipeline(torch_dtype=torch.float32, directory=TOY_DIR):
    """The shipped toy-sd1 as a ``StableDiffusionPipeline`` (no safety checker), nothing downloaded."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    if not is_available(directory):
        raise FileNotFoundError(f"toy-sd1 is missing: {directory} has no model_index.json "
                                "(para-trainer toyworld pretrain writes it)")
    pipe = StableDiffusionPipeline.from_pretrained(directory, torch_dtype=torch_dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_SAVED_BY = ("_diffusers_version", "_name_or_path", "dtype", "torch_dtype", "transformers_version")


def component_config(component: str, directory=TOY_DIR) -> dict:
    """The shipped config of one component ("unet", "vae", "text_encoder", "scheduler"), without the keys that
    only record who saved it."""
    directory = Path(directory)
    name = "scheduler/scheduler_config.json" if component == "scheduler" else f"{component}/config.json"
    config = json.loads((directory / name).read_text())
    return {k: v for k, v in config.items() if k not in _SAVED_BY}
