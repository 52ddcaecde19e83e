"""FLUX.1 base models as the rest of para-trainer sees them: the pipeline, its transformer (passed to networks as
sd-scripts passes its `flux` model, in the `unet` slot) and the [CLIP-L, T5-XXL] text encoders."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

BUILTIN_FLUX = {"tiny-flux": "flux1"}
BASE_MODEL_VERSION = "flux1"  # sd-scripts' ss_base_model_version for FLUX.1 dev and schnell


@dataclass
class FluxModels:
    """The same interface as `StableDiffusionModels` where export, merge, inspect and sample need it."""

    pipeline: object
    source: str
    kind: str = "flux"
    v_parameterization: bool = False
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)

    def __post_init__(self):
        pipe = self.pipeline
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]

    @property
    def unet(self):
        """The FLUX transformer: sd-scripts hands it to networks where SD's UNet goes."""
        return self.pipeline.transformer

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def is_sdxl(self) -> bool:
        return False

    @property
    def text_encoder_for_network(self) -> list:
        return self.text_encoders

    @property
    def base_model_version(self) -> str:
        return BASE_MODEL_VERSION

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def latent_shift(self) -> float:
        return self.vae.config.shift_factor

    @property
    def default_t5_max_length(self) -> int:
        """sd-scripts' --t5xxl_max_token_length default: 512 for dev, 256 for schnell (at most the tokenizer's)."""
        return min(512 if self.has_guidance else 256, self.tokenizers[1].model_max_length)

    @property
    def architecture(self) -> str:
        """ModelSpec's architecture: dev embeds the guidance scale, schnell does not."""
        return "flux-1-dev" if self.has_guidance else "flux-1-schnell"

    @property
    def has_guidance(self) -> bool:
        """FLUX.1 dev embeds the guidance scale; schnell does not."""
        return bool(self.unet.config.guidance_embeds)


def is_flux_pipeline_folder(source: str) -> bool:
    index = os.path.join(source, "model_index.json")
    if not os.path.isfile(index):
        return False
    with open(index, encoding="utf-8") as f:
        return json.load(f).get("_class_name", "").startswith("Flux")


def is_bfl_flux_file(path: str) -> bool:
    """A .safetensors file holding a FLUX transformer in the BFL layout (double_blocks.N..., single_blocks.N...)."""
    if not str(path).endswith(".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return any(key.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for key in f.keys())
    except Exception:  # not a safetensors file after all: the regular loader says what is wrong
        return False


def load_flux_pipeline(source: str, torch_dtype=torch.float32):
    """builtin:tiny-flux or a diffusers FluxPipeline folder, frozen and in eval mode."""
    if source.startswith("builtin:"):
        from .tiny import build_tiny_flux

        pipe = build_tiny_flux(seed=0, torch_dtype=torch_dtype)
    else:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(source, torch_dtype=torch_dtype)
    return freeze(pipe)


def freeze(pipe):
    """Every part frozen and in eval mode, no progress bars: as training and sampling take a pipeline."""
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        model.requires_grad_(False)
        model.eval()
    return pipe
