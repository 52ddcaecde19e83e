"""Loading the base model the trainer adapts, and encoding prompts the way sd-scripts does.

`--pretrained_model_name_or_path` may be a diffusers folder, a single-file checkpoint (.safetensors/.ckpt, as
A1111 users keep them; read without unpickling code), a Hub repo id, `builtin:toy-sd1` (the SD1-architecture
model pretrained on the toy world, shipped in the package) or `builtin:tiny-sd1|tiny-sd2|tiny-sdxl`, the embedded
random-weight tiny models (nothing to download).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from .flux.models import FluxModels, freeze, is_bfl_flux_file, is_flux_pipeline_folder, load_flux_pipeline

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl", "toy-sd1": "sd1", "tiny-flux": "flux"}
# sd-scripts' base model versions (ss_base_model_version) and their ModelSpec architecture names
ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v1_v": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
                 "sd_v2_v": "stable-diffusion-v2-768-v", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
                 "flux1": "flux-1-dev"}
# modelspec.implementation as sd-scripts writes it for an adapter of each base (SD1/SD2: "diffusers")
IMPLEMENTATIONS = {"sdxl_base_v1-0": "https://github.com/Stability-AI/generative-models",
                   "flux1": "https://github.com/black-forest-labs/flux"}


class ModelError(ValueError):
    """The base model cannot be found or loaded."""


@dataclass
class StableDiffusionModels:
    """What training needs from a Stable Diffusion model, and the pipeline that samples with it."""

    pipeline: object
    kind: str  # "sd1", "sd2" or "sdxl"
    v_parameterization: bool
    source: str  # the path or id it came from
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)

    def __post_init__(self):
        pipe = self.pipeline
        self.text_encoders = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]
        self.tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def text_encoder_for_network(self):
        """A single text encoder for SD1/SD2, the list of two for SDXL — what sd-scripts passes to networks."""
        return self.text_encoders if self.is_sdxl else self.text_encoders[0]

    @property
    def base_model_version(self) -> str:
        """sd-scripts' ss_base_model_version."""
        if self.is_sdxl:
            return "sdxl_base_v1-0"
        return f"sd_{'v2' if self.kind == 'sd2' else 'v1'}{'_v' if self.v_parameterization else ''}"

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    latent_shift = 0.0  # FLUX's autoencoder has one

    @property
    def architecture(self) -> str:
        """ModelSpec's architecture (without "/lora")."""
        return ARCHITECTURES[self.base_model_version]


def noise_scheduler(v_parameterization: bool):
    """sd-scripts' fixed training scheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, prediction_type="v_prediction" if v_parameterization else "epsilon")


def _pipeline_kind(pipe) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None or pipe.unet.config.addition_embed_type == "text_time":
        return "sdxl"
    # SD2's UNet uses Linear projections and a 1024-wide context (OpenCLIP-H); the tiny one keeps the first.
    return "sd2" if pipe.unet.config.use_linear_projection else "sd1"


def load_models(args, torch_dtype=torch.float32) -> StableDiffusionModels:
    """The model named by --pretrained_model_name_or_path, with --v2/--sdxl/--v_parameterization/--vae applied."""
    source = args.pretrained_model_name_or_path
    if not source:
        raise ModelError("--pretrained_model_name_or_path is required (a diffusers folder, a .safetensors/.ckpt "
                         "checkpoint, a Hub repo id, builtin:toy-sd1 for the model pretrained on the toy world, or "
                         "builtin:tiny-sd1 for the embedded random tiny model)")
    if source.startswith(BUILTIN_PREFIX + "tiny-flux") or (os.path.isdir(source) and is_flux_pipeline_folder(source)):
        return _load_flux(args, source, torch_dtype)
    if source.startswith(BUILTIN_PREFIX):
        pipe = _load_builtin(source, torch_dtype)
    elif os.path.isfile(source):
        from .checkpoint import load_single_file

        if is_bfl_flux_file(source):
            return _load_flux(args, source, torch_dtype)
        pipe = load_single_file(source, v2=args.v2, sdxl=True if getattr(args, "sdxl", False) else None,
                                v_parameterization=args.v_parameterization, torch_dtype=torch_dtype,
                                tokenizer_dir=getattr(args, "tokenizer_cache_dir", None))
    else:
        pipe = _load_diffusers(source, getattr(args, "sdxl", False), torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    kind = _pipeline_kind(pipe)
    if getattr(args, "sdxl", False) and kind != "sdxl":
        raise ModelError(f"--sdxl was given but {source} is not an SDXL model")
    if args.v2 and kind == "sdxl":
        raise ModelError("--v2 cannot be used with an SDXL model")
    if args.v2 and kind == "sd1":
        kind = "sd2"  # an SD2 512-base checkpoint converted with SD1-style projections
    v_param = bool(args.v_parameterization)
    if not v_param and pipe.scheduler.config.get("prediction_type") == "v_prediction":
        v_param = True
        logger.warning("%s predicts v (its scheduler says v_prediction): training with v-parameterization, as "
                       "--v_parameterization would", source)
    if getattr(args, "vae", None):
        pipe.vae = _load_vae(args.vae, torch_dtype)
    for model in (pipe.unet, pipe.vae, *[te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te]):
        model.requires_grad_(False)
        model.eval()
    return StableDiffusionModels(pipe, kind, v_param, source)


def _load_flux(args, source: str, torch_dtype) -> FluxModels:
    for option in ("v2", "v_parameterization", "sdxl"):
        if getattr(args, option, False):
            raise ModelError(f"--{option} is a Stable Diffusion option; {source} is a FLUX.1 model (leave it out)")
    if getattr(args, "vae", None):
        raise ModelError(f"--vae is Stable Diffusion's option; {source} is a FLUX.1 model, whose autoencoder is "
                         "given with --ae")
    parts = {name: getattr(args, name, None) for name in ("ae", "clip_l", "t5xxl")}
    if os.path.isfile(source):  # sd-scripts' FLUX files: the BFL transformer and the three others
        from .flux.bfl import BflError, load_bfl_pipeline

        try:
            pipe = load_bfl_pipeline(source, **parts, torch_dtype=torch_dtype,
                                     tokenizer_dir=getattr(args, "tokenizer_cache_dir", None))
        except BflError as error:
            raise ModelError(str(error)) from None
        return FluxModels(freeze(pipe), source)
    given = [f"--{name}" for name, path in parts.items() if path]
    if given:
        raise ModelError(f"{given[0]} goes with a BFL single-file transformer (flux1-dev.safetensors); {source} "
                         "already holds every part: leave it out")
    return FluxModels(load_flux_pipeline(source, torch_dtype), source)


def _load_builtin(source: str, torch_dtype):
    from .tiny import build_tiny_pipeline

    name = source[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model {source!r}; choose one of "
                         + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS))
    if name == "toy-sd1":
        from ..toyworld.model import load_toy_pipeline

        try:
            return load_toy_pipeline(torch_dtype)
        except FileNotFoundError as error:
            raise ModelError(str(error)) from None
    return build_tiny_pipeline(BUILTIN_MODELS[name], seed=0, torch_dtype=torch_dtype)


def _load_diffusers(source: str, force_sdxl: bool, torch_dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = os.path.join(source, "model_index.json")
    if os.path.isdir(source):
        if not os.path.isfile(index):
            raise ModelError(f"{source} is a folder but not a diffusers model (no model_index.json)")
        with open(index, encoding="utf-8") as f:
            sdxl = force_sdxl or "XL" in json.load(f).get("_class_name", "")
    elif os.path.exists(source) or source.endswith((".safetensors", ".ckpt")) or source.count("/") != 1:
        raise ModelError(f"model not found: {source} (not a file, not a folder, not a Hub repo id user/name)")
    else:
        sdxl = force_sdxl
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        return pipeline_class.from_pretrained(source, torch_dtype=torch_dtype, **extra)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelError(f"cannot load {source}: {error}".strip() + (
            " (HF_HUB_OFFLINE=1 is set and the model is not in the local cache)" if offline else "")) from None


def _load_vae(source: str, torch_dtype):
    from diffusers import AutoencoderKL

    local = os.path.isabs(source) or source.startswith(".") or source.endswith((".safetensors", ".ckpt", ".pt")) \
        or source.count("/") != 1
    if local and not os.path.exists(source):
        raise ModelError(f"--vae {source}: no such file or folder (give a .safetensors/.ckpt VAE file, a diffusers "
                         "VAE folder, or a Hub repo id user/name)")
    try:
        if os.path.isfile(source):
            return AutoencoderKL.from_single_file(source, torch_dtype=torch_dtype)
        if os.path.isdir(os.path.join(source, "vae")):
            return AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype)
        return AutoencoderKL.from_pretrained(source, torch_dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the VAE {source}: {error}") from None


# --------------------------------------------------------------------------------------------------
# Prompt encoding (sd-scripts' clip_skip and max_token_length)


def _final_layer_norm(text_encoder):
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def _token_chunks(tokenizer, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """Token ids (batch, chunks, 77): sd-scripts encodes 150/225 tokens as 2/3 windows of 75 + bos/eos."""
    chunks = (max_token_length or 75) // 75
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=chunks * 75 + 2,
                    return_tensors="pt").input_ids
    if chunks == 1:
        return ids[:, None]
    bos, body, last = ids[:, :1], ids[:, 1:-1], ids[:, -1:]
    windows = []
    for i in range(chunks):
        window = body[:, i * 75:(i + 1) * 75]
        end = last if i == chunks - 1 else torch.full_like(last, tokenizer.eos_token_id)
        windows.append(torch.cat([bos, window, end], dim=1))
    return torch.stack(windows, dim=1)


def _encode_windows(text_encoder, ids: torch.Tensor, layer: int | None, norm: bool, pooled: bool = False):
    batch, chunks, length = ids.shape
    out = text_encoder(ids.reshape(batch * chunks, length).to(text_encoder.device), output_hidden_states=True)
    hidden = out.hidden_states[layer] if layer is not None else out.last_hidden_state
    if norm and layer is not None:
        hidden = _final_layer_norm(text_encoder)(hidden)
    hidden = hidden.reshape(batch, chunks, length, -1)
    if chunks > 1:  # bos of the first window, the 75 tokens of every window, eos of the last
        hidden = torch.cat([hidden[:, 0, :1]] + [hidden[:, i, 1:-1] for i in range(chunks)] + [hidden[:, -1, -1:]],
                           dim=1)
    else:
        hidden = hidden[:, 0]
    if pooled:
        return hidden, out.text_embeds.reshape(batch, chunks, -1)[:, 0]
    return hidden


def encode_prompts(models: StableDiffusionModels, captions: list[str], clip_skip: int | None = None,
                   max_token_length: int | None = None):
    """(encoder_hidden_states, added_cond_kwargs or None) for the UNet, as sd-scripts computes them."""
    if not models.is_sdxl:
        layer = -clip_skip if clip_skip and clip_skip > 1 else None
        ids = _token_chunks(models.tokenizers[0], captions, max_token_length)
        return _encode_windows(models.text_encoders[0], ids, layer, norm=True), None
    # SDXL: the penultimate layer of both encoders, concatenated; the pooled output of the second.
    hidden1 = _encode_windows(models.text_encoders[0], _token_chunks(models.tokenizers[0], captions, max_token_length),
                              -2, norm=False)
    hidden2, pooled = _encode_windows(models.text_encoders[1],
                                      _token_chunks(models.tokenizers[1], captions, max_token_length), -2, norm=False,
                                      pooled=True)
    return torch.cat([hidden1, hidden2], dim=-1), {"text_embeds": pooled}


def sdxl_time_ids(height: int, width: int, batch: int, device) -> torch.Tensor:
    """SDXL's size conditioning: original size, crop (0, 0), target size — the training resolution."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device).repeat(batch, 1)
