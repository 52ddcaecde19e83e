"""Single-file Stable Diffusion checkpoints: the one .safetensors/.ckpt A1111, ComfyUI and sd-scripts load.

Such a file keeps the original LDM/SGM key layout: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE) and the text encoder(s) — ``cond_stage_model.transformer.text_model.*`` (SD1, CLIP-L),
``cond_stage_model.model.*`` (SD2, OpenCLIP-H) or ``conditioner.embedders.0.transformer.text_model.*`` and
``conditioner.embedders.1.model.*`` (SDXL, CLIP-L and OpenCLIP-bigG).

Each component's diffusers <-> LDM correspondence is one declarative ``Layout`` (a table of key renames, generated
from the model config, plus the few tensors that are stacked, transposed or reshaped); saving applies it, loading
applies its inverse. Loading builds the model configs by matching the file's tensor shapes against the known
models: the tiny ones of ``tiny_configs/``, the real SD1.5, SD2.x and SDXL-base ones of ``model_configs/`` and
builtin:toy-sd1 (``toyworld/toy-sd1/``).
Files are read without unpickling code (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import pickle
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from networks.adapter_base import empty_file_message

from .. import __version__
from .loading import ARCHITECTURES
from .tiny import CONFIG_DIR as TINY_CONFIG_DIR  # importing tiny_models also hushes diffusers' import
from .tiny import KINDS, TOKENIZER_PAD_TOKENS
from .tiny_tokenizer import TOKENIZER_DIR

logger = logging.getLogger(__name__)

REAL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
CONFIG_SOURCES = {"tiny": TINY_CONFIG_DIR, "real": REAL_CONFIG_DIR, "toy": None}  # toy: builtin:toy-sd1's folder
REAL_MODEL_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base"}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (pipeline attribute, LDM key prefix) of every component, per model kind.
COMPONENTS = {
    "sd1": [("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", "cond_stage_model.transformer.")],
    "sd2": [("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", "cond_stage_model.model.")],
    "sdxl": [("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", "conditioner.embedders.0.transformer."),
             ("text_encoder_2", "conditioner.embedders.1.model.")],
}

# Hub repos whose tokenizer fits each real text encoder, most specific first. All use the same CLIP BPE vocabulary
# (OpenCLIP's tokenizer is CLIP's); only the pad token differs, and it is set from TOKENIZER_PAD_TOKENS.
TOKENIZER_SOURCES = {
    ("sd1", 0): [("openai/clip-vit-large-patch14", None), ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                 ("runwayml/stable-diffusion-v1-5", "tokenizer")],
    ("sd2", 0): [("stabilityai/stable-diffusion-2", "tokenizer"), ("stabilityai/stable-diffusion-2-1", "tokenizer"),
                 ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None), ("openai/clip-vit-large-patch14", None)],
    ("sdxl", 0): [("openai/clip-vit-large-patch14", None), ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer")],
    ("sdxl", 1): [("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None),
                  ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"), ("openai/clip-vit-large-patch14", None)],
}

_SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A single-file checkpoint cannot be read, recognised or written."""


# ---------------------------------------------------------------------------------------------------------------
# Layouts: diffusers <-> LDM key tables


@dataclass
class Layout:
    """How one component's diffusers state dict maps to its LDM one (keys relative to the component prefix)."""

    renames: dict[str, str]  # diffusers key prefix (ending in ".") or whole key -> LDM one
    stacked: dict[str, list[str]] = field(default_factory=dict)  # LDM key -> diffusers keys concatenated on dim 0
    transposed: set[str] = field(default_factory=set)  # LDM keys holding the transpose (OpenCLIP's x @ proj)
    conv1x1: set[str] = field(default_factory=set)  # LDM keys holding a Linear weight as a 1x1 conv
    copies: dict[str, str] = field(default_factory=dict)  # LDM prefix written as a copy of another; never read
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # LDM key written as a fixed value; never read

    def is_optional(self, ldm_key: str) -> bool:
        """Whether an LDM key is written for other tools (or by older ones) but neither needed nor required here."""
        return (ldm_key in self.constants or ldm_key.startswith(tuple(self.copies))
                or ldm_key.endswith(_REBUILT_BUFFERS))

    def fits(self, ldm_key: str, shape: tuple, expected: dict) -> bool:
        """Whether a file tensor of this shape fits a model whose LDM shapes are ``expected``."""
        want = expected.get(ldm_key)
        # some converters store the VAE attention's 1x1 convs as plain Linear weights; both load
        return want == shape or (ldm_key in self.conv1x1 and want is not None and want[:2] == shape)


# Buffers that some files carry and the models rebuild themselves (CLIP's position ids, OpenCLIP's mask).
_REBUILT_BUFFERS = ("position_ids", "attn_mask")


def _rename(key: str, table: dict[str, str]) -> str | None:
    if key in table:
        return table[key]
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):  # longest matching prefix wins
        prefix = ".".join(parts[:n]) + "."
        if prefix in table:
            return table[prefix] + key[len(prefix):]
    return None


_UNET_RESNET_PARTS = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                      ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
                      ("conv_shortcut.", "skip_connection.")]


def unet_layout(config: dict) -> Layout:
    """UNet2DConditionModel -> LDM/SGM ``openaimodel.UNetModel`` (input_blocks / middle_block / output_blocks)."""
    renames = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
               "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
               "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
               "mid_block.attentions.0.": "middle_block.1."}
    resnets = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    per_level = config["layers_per_block"] + 1  # LDM counts the down/upsampler as one more block per level
    levels = len(config["down_block_types"])
    for level, block_type in enumerate(config["down_block_types"]):
        for j in range(per_level - 1):
            ldm = f"input_blocks.{1 + level * per_level + j}."
            resnets[f"down_blocks.{level}.resnets.{j}."] = ldm + "0."
            if "CrossAttn" in block_type:
                renames[f"down_blocks.{level}.attentions.{j}."] = ldm + "1."
        if level < levels - 1:
            renames[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{(level + 1) * per_level}.0.op."
    for level, block_type in enumerate(config["up_block_types"]):
        has_attention = "CrossAttn" in block_type
        for j in range(per_level):
            ldm = f"output_blocks.{level * per_level + j}."
            resnets[f"up_blocks.{level}.resnets.{j}."] = ldm + "0."
            if has_attention:
                renames[f"up_blocks.{level}.attentions.{j}."] = ldm + "1."
        if level < levels - 1:  # the upsampler follows the last resnet (and its attention, if any)
            last = level * per_level + per_level - 1
            renames[f"up_blocks.{level}.upsamplers.0."] = f"output_blocks.{last}.{2 if has_attention else 1}."
    for diffusers_prefix, ldm_prefix in resnets.items():
        for diffusers_part, ldm_part in _UNET_RESNET_PARTS:
            renames[diffusers_prefix + diffusers_part] = ldm_prefix + ldm_part
    return Layout(renames)


_VAE_ATTENTION_PARTS = [("group_norm.", "norm.", False), ("to_q.", "q.", True), ("to_k.", "k.", True),
                        ("to_v.", "v.", True), ("to_out.0.", "proj_out.", True)]


def vae_layout(config: dict) -> Layout:
    """AutoencoderKL -> LDM ``AutoencoderKL`` (encoder.down.N.block.M, decoder.up numbered in reverse, mid.attn_1)."""
    levels = len(config["block_out_channels"])
    renames = {name: name for name in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.",
                                       "decoder.conv_out.", "quant_conv.", "post_quant_conv.")}
    resnets = {}
    for level in range(levels):
        for j in range(config["layers_per_block"]):
            resnets[f"encoder.down_blocks.{level}.resnets.{j}."] = f"encoder.down.{level}.block.{j}."
        for j in range(config["layers_per_block"] + 1):
            resnets[f"decoder.up_blocks.{level}.resnets.{j}."] = f"decoder.up.{levels - 1 - level}.block.{j}."
        if level < levels - 1:
            renames[f"encoder.down_blocks.{level}.downsamplers.0."] = f"encoder.down.{level}.downsample."
            renames[f"decoder.up_blocks.{level}.upsamplers.0."] = f"decoder.up.{levels - 1 - level}.upsample."
    conv1x1 = set()
    for side in ("encoder", "decoder"):
        renames[f"{side}.conv_norm_out."] = f"{side}.norm_out."
        for k in range(2):
            resnets[f"{side}.mid_block.resnets.{k}."] = f"{side}.mid.block_{k + 1}."
        for diffusers_part, ldm_part, is_linear in _VAE_ATTENTION_PARTS:
            renames[f"{side}.mid_block.attentions.0.{diffusers_part}"] = f"{side}.mid.attn_1.{ldm_part}"
            if is_linear:
                conv1x1.add(f"{side}.mid.attn_1.{ldm_part}weight")
    for diffusers_prefix, ldm_prefix in resnets.items():
        renames[diffusers_prefix] = ldm_prefix
        renames[diffusers_prefix + "conv_shortcut."] = ldm_prefix + "nin_shortcut."
    return Layout(renames, conv1x1=conv1x1)


def clip_layout(config: dict, with_projection: bool = False) -> Layout:
    """transformers' CLIP text model (keys under ``text_model.``) -> the same keys: SD1/SDXL keep the HF layout."""
    renames = {p: p for p in ("text_model.embeddings.", "text_model.encoder.", "text_model.final_layer_norm.")}
    if with_projection:
        renames["text_projection."] = "text_projection."
    return Layout(renames)


_OPENCLIP_LAYER_PARTS = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                         ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")]


def open_clip_layout(config: dict, with_projection: bool, penultimate: bool = False) -> Layout:
    """transformers' CLIP text model -> OpenCLIP's ``TextTransformer`` (resblocks with stacked q/k/v in_proj).

    ``penultimate``: the diffusers model is OpenCLIP minus its last layer (SD2 conditions on the penultimate one),
    so the file gets a stand-in last layer (a copy), as sd-scripts writes it; loaders skip it.
    """
    renames = {"text_model.embeddings.token_embedding.": "token_embedding.",
               "text_model.embeddings.position_embedding.weight": "positional_embedding",
               "text_model.final_layer_norm.": "ln_final."}
    stacked = {}
    layers = config["num_hidden_layers"]
    for i in range(layers):
        hf, ldm = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for hf_part, ldm_part in _OPENCLIP_LAYER_PARTS:
            renames[hf + hf_part] = ldm + ldm_part
        for kind in ("weight", "bias"):
            stacked[f"{ldm}attn.in_proj_{kind}"] = [f"{hf}self_attn.{q}_proj.{kind}" for q in "qkv"]
    layout = Layout(renames, stacked, constants={"logit_scale": torch.tensor(math.log(100.0))})
    if with_projection:
        layout.renames["text_projection.weight"] = "text_projection"
        layout.transposed.add("text_projection")
    else:  # OpenCLIP always has one; SD2 never uses it
        layout.constants["text_projection"] = torch.eye(config["hidden_size"])
    if penultimate:
        layout.copies[f"transformer.resblocks.{layers}."] = f"transformer.resblocks.{layers - 1}."
    return layout


def component_layout(kind: str, component: str, config: dict, with_projection: bool) -> Layout:
    if component == "unet":
        return unet_layout(config)
    if component == "vae":
        return vae_layout(config)
    if component == "text_encoder" and kind != "sd2":
        return clip_layout(config, with_projection)
    return open_clip_layout(config, with_projection, penultimate=kind == "sd2")


def to_ldm(layout: Layout, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers state dict (text encoders' keys under ``text_model.``) in the LDM layout."""
    stacked_parts = {part for parts in layout.stacked.values() for part in parts}
    out = {}
    for key, tensor in state_dict.items():
        if key in stacked_parts or key.endswith(_REBUILT_BUFFERS):
            continue
        ldm_key = _rename(key, layout.renames)
        if ldm_key is None:
            raise CheckpointError(f"cannot write {key}: the model has a parameter with no place in the "
                                  "single-file (LDM) layout; save it as a diffusers folder instead")
        if ldm_key in layout.transposed:
            tensor = tensor.T.contiguous()
        if ldm_key in layout.conv1x1:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[ldm_key] = tensor
    for ldm_key, parts in layout.stacked.items():
        out[ldm_key] = torch.cat([state_dict[part] for part in parts])
    for copy_prefix, source_prefix in layout.copies.items():
        for key in [k for k in out if k.startswith(source_prefix)]:
            out[copy_prefix + key[len(source_prefix):]] = out[key].clone()
    reference = next(iter(state_dict.values()))
    for ldm_key, value in layout.constants.items():
        out[ldm_key] = value.to(device=reference.device, dtype=reference.dtype)
    return out


def from_ldm(layout: Layout, ldm_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``to_ldm``; optional keys are skipped."""
    inverse = {ldm: diffusers for diffusers, ldm in layout.renames.items()}
    out = {}
    for key, tensor in ldm_state_dict.items():
        if layout.is_optional(key):
            continue
        if key in layout.stacked:
            for part, chunk in zip(layout.stacked[key], tensor.chunk(3)):
                out[part] = chunk.clone()  # separate storage, so the model can be saved with safetensors
            continue
        if key in layout.transposed:
            tensor = tensor.T.contiguous()
        if key in layout.conv1x1:
            tensor = tensor.reshape(tensor.shape[:2])
        out[_rename(key, inverse)] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------------
# Saving


def save_single_file(pipe, path, kind: str | None = None, dtype=None) -> Path:
    """Write ``pipe``'s UNet, VAE and text encoder(s) as one A1111-style checkpoint; return its path.

    ``kind`` ("sd1", "sd2", "sdxl") is inferred from the pipeline when omitted. ``dtype`` (a torch dtype or
    sd-scripts' "float"/"fp16"/"bf16") casts the floating-point tensors. A ``.safetensors`` path gets a safetensors
    file with ModelSpec metadata; any other a ``torch.save({"state_dict": ...})`` file. Written atomically.
    """
    path = Path(path)
    kind = kind or _pipeline_kind(pipe)
    if kind not in KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    save_dtype = _save_dtype(dtype)
    state_dict = {}
    for component, prefix in COMPONENTS[kind]:
        model = getattr(pipe, component, None)
        if model is None:
            raise CheckpointError(f"cannot save a {kind} checkpoint: the pipeline has no {component}")
        layout = component_layout(kind, component, _config_dict(model), hasattr(model, "text_projection"))
        for key, tensor in to_ldm(layout, _with_text_model_prefix(model.state_dict(), component)).items():
            tensor = tensor.detach().to("cpu")
            if save_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(save_dtype)
            state_dict[prefix + key] = tensor.contiguous()
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt", **_modelspec(pipe, kind, path)}
        _write_atomically(path, lambda tmp: save_file(state_dict, tmp, metadata=metadata))
    else:
        _write_atomically(path, lambda tmp: torch.save({"state_dict": state_dict}, tmp))
    return path


def _pipeline_kind(pipe) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    # OpenCLIP (SD2) uses GELU, OpenAI's CLIP-L (SD1) quick_gelu: that decides the text-encoder layout.
    return "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"


def _save_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _SAVE_DTYPES:
        raise CheckpointError(f"unknown save precision {dtype!r}; use one of float, fp16, bf16 or a torch dtype")
    return _SAVE_DTYPES[str(dtype)]


def _config_dict(model) -> dict:
    config = model.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _with_text_model_prefix(state_dict: dict, component: str) -> dict:
    """transformers 5's CLIPTextModel has no ``text_model`` level; the layouts expect its keys under it."""
    if not component.startswith("text_encoder"):
        return state_dict
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in state_dict.items()}


def _modelspec(pipe, kind: str, path: Path) -> dict[str, str]:
    v_prediction = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    version = {"sd1": "sd_v1", "sd2": "sd_v2_v" if v_prediction else "sd_v2", "sdxl": "sdxl_base_v1-0"}[kind]
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURES[version],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if kind == "sdxl"
        else "diffusers",
        "modelspec.implementation_version": f"para-trainer/{__version__}",
        "modelspec.title": path.stem,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }


def _write_atomically(path: Path, write) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_single_file(path, v2: bool = False, sdxl: bool | None = None, v_parameterization: bool = False,
                     torch_dtype=torch.float32, tokenizer_dir=None):
    """A diffusers StableDiffusionPipeline / StableDiffusionXLPipeline from a single-file checkpoint.

    SDXL is detected from the keys (``conditioner.embedders.1``) unless ``sdxl`` is given; SD2 is expected with
    ``v2`` (as in sd-scripts) but also detected from ``cond_stage_model.model.*`` with a warning. The configs are
    those of the known model (tiny, SD1.5, SD2.x, SDXL base) whose tensor shapes match. The scheduler predicts v
    when ``v_parameterization`` is set or the file's ModelSpec says so. The tokenizers of real models come from
    ``tokenizer_dir`` (a tokenizer folder, or sd-scripts' --tokenizer_cache_dir) or the local Hugging Face cache.
    """
    path = str(path)
    state_dict, metadata = _read_checkpoint(path)
    state_dict = _normalize_keys(state_dict)
    kind = _detect_kind(path, state_dict, v2, sdxl)
    weights, sources = {}, {}
    for component, prefix in COMPONENTS[kind]:
        weights[component] = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        sources[component] = _match_config(path, kind, component, prefix, weights[component])
    del state_dict
    models = {}
    text_encoders = [c for c, _ in COMPONENTS[kind] if c.startswith("text_encoder")]
    for index, component in enumerate(text_encoders):  # before building: a missing tokenizer fails fast
        models["tokenizer" if index == 0 else "tokenizer_2"] = _load_tokenizer(path, kind, index, sources[component],
                                                                                tokenizer_dir)
    for component, _ in COMPONENTS[kind]:
        # popped, so that each component's tensors from the file are freed once it is built
        models[component] = _build_model(kind, component, sources[component], weights.pop(component), torch_dtype)

    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler_config = _read_config(sources["unet"], kind, "scheduler")
    v_from_metadata = metadata.get("modelspec.prediction_type") == "v"
    if v_from_metadata and not v_parameterization:
        logger.info("%s says it predicts v (modelspec.prediction_type); its scheduler uses v_prediction", path)
    scheduler_config["prediction_type"] = "v_prediction" if v_parameterization or v_from_metadata else "epsilon"
    scheduler = DDIMScheduler.from_config(scheduler_config)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(**models, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(**models, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(empty_file_message(path))
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
        except Exception as error:  # safetensors raises its own SafetensorError, or OSError
            raise CheckpointError(f"cannot read {path}: {error} (the file is truncated or corrupt; download or "
                                  "save it again)") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise CheckpointError(f"{path} contains pickled Python objects besides tensors, which are not loaded "
                                  "because unpickling can run code; convert it to .safetensors with a tool you "
                                  "trust") from None
        raise CheckpointError(f"cannot read {path}: {error} (the file is truncated or corrupt)") from None
    except Exception as error:  # torch's zip errors, EOF, or safetensors' own error types (torch hands .safetensors on)
        reason = str(error).split(". ")[0]  # torch's zip errors go on for several sentences
        raise CheckpointError(f"cannot read {path}: {reason} (the file is truncated, corrupt "
                              "or not a .ckpt/.safetensors checkpoint)") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}, {}


# Some SD1 files store CLIP without the text_model level (older transformers); sd-scripts accepts them too.
_CLIP_WITHOUT_TEXT_MODEL = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")


def _normalize_keys(state_dict: dict) -> dict:
    out = {}
    for key, tensor in state_dict.items():
        for prefix in _CLIP_WITHOUT_TEXT_MODEL:
            if key.startswith(prefix) and key[len(prefix):].startswith(("embeddings.", "encoder.",
                                                                        "final_layer_norm.")):
                key = prefix + "text_model." + key[len(prefix):]
        out[key] = tensor
    return out


def _detect_kind(path: str, state_dict: dict, v2: bool, sdxl: bool | None) -> str:
    def has(prefix):
        return any(key.startswith(prefix) for key in state_dict)

    if not has(UNET_PREFIX):
        first = next(iter(sorted(state_dict)), None)
        raise CheckpointError(f"{path} is not a Stable Diffusion checkpoint: it has no {UNET_PREFIX}* (UNet) "
                              f"tensors (first key: {first!r}); give a full SD1/SD2/SDXL checkpoint or a diffusers "
                              "folder")
    if has("conditioner.embedders.1."):
        kind = "sdxl"
    elif has("cond_stage_model.model."):
        kind = "sd2"
    elif has("cond_stage_model.transformer."):
        kind = "sd1"
    else:
        raise CheckpointError(f"{path} has a UNet but no SD1/SD2/SDXL-base text encoder (cond_stage_model.* or "
                              "conditioner.embedders.0/1.*); other models (e.g. the SDXL refiner) are not supported")
    if sdxl and kind != "sdxl":
        raise CheckpointError(f"--sdxl was given but {path} is not an SDXL checkpoint (no conditioner.embedders.1.*)")
    if sdxl is False and kind == "sdxl":
        raise CheckpointError(f"{path} is an SDXL checkpoint but SDXL was ruled out (sdxl=False); use --sdxl")
    if v2 and kind == "sdxl":
        raise CheckpointError(f"--v2 cannot be used with {path}: it is an SDXL checkpoint; drop --v2")
    if v2 and kind == "sd1":
        raise CheckpointError(f"--v2 was given but {path} is an SD1 checkpoint (CLIP-L cond_stage_model.transformer.*"
                              ", not SD2's OpenCLIP cond_stage_model.model.*); drop --v2")
    if kind == "sd2" and not v2:
        logger.warning("%s is an SD2 checkpoint (OpenCLIP text encoder, cond_stage_model.model.*) but --v2 was not "
                       "given; loading it as SD2 (sd-scripts would need --v2)", path)
    return kind


def _read_config(source: str, kind: str, component: str) -> dict:
    if source == "toy":
        from ..toyworld.model import component_config

        return component_config(component)
    return json.loads((CONFIG_SOURCES[source] / kind / f"{component}.json").read_text())


def _config_sources(kind: str) -> list[str]:
    """The known models of ``kind`` to match a file against: tiny, real, and toy-sd1 where it is installed."""
    from ..toyworld.model import is_available

    return [s for s in CONFIG_SOURCES if s != "toy" or (kind == "sd1" and is_available())]


def _has_projection(config: dict) -> bool:
    return (config.get("architectures") or [""])[0] == "CLIPTextModelWithProjection"


def _layout_for(source: str, kind: str, component: str) -> Layout:
    config = _read_config(source, kind, component)
    return component_layout(kind, component, config, _has_projection(config))


def _new_model(config: dict):
    """The model of a config; build it under ``torch.device("meta")`` or ``init_empty_weights`` to skip init."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    class_name = config.get("_class_name") or config["architectures"][0]
    if class_name == "UNet2DConditionModel":
        return UNet2DConditionModel.from_config(config)
    if class_name == "AutoencoderKL":
        return AutoencoderKL.from_config(config)
    text_config = CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
    return (CLIPTextModelWithProjection if _has_projection(config) else CLIPTextModel)(text_config)


@functools.lru_cache(maxsize=None)
def _expected_shapes(source: str, kind: str, component: str) -> dict[str, tuple[int, ...]]:
    """LDM key -> shape of a known model, found by converting its meta-device (memory-free) build."""
    with torch.device("meta"):
        model = _new_model(_read_config(source, kind, component))
    ldm = to_ldm(_layout_for(source, kind, component), _with_text_model_prefix(model.state_dict(), component))
    return {key: tuple(tensor.shape) for key, tensor in ldm.items()}


def _match_config(path: str, kind: str, component: str, prefix: str, weights: dict) -> str:
    """The config source ("tiny" or "real") whose ``component`` has exactly the file's tensor shapes."""
    if not weights:
        raise CheckpointError(f"{path} has no {component} tensors ({prefix}*); a full checkpoint is needed")
    candidates = []
    for source in _config_sources(kind):
        expected, layout = _expected_shapes(source, kind, component), _layout_for(source, kind, component)
        fits = all(layout.fits(k, tuple(v.shape), expected) or layout.is_optional(k) for k, v in weights.items())
        missing = [k for k in expected if k not in weights and not layout.is_optional(k)]
        if fits and not missing:
            return source
        candidates.append((expected, layout, missing))
    known = f"the tiny {kind} model{', toy-sd1' if kind == 'sd1' else ''} or {REAL_MODEL_NAMES[kind]}"
    for key in sorted(weights):
        shape = tuple(weights[key].shape)
        if not any(layout.fits(key, shape, exp) or layout.is_optional(key) for exp, layout, _ in candidates):
            raise CheckpointError(f"{path}: {prefix}{key} (shape {list(shape)}) matches no known {component} of "
                                  f"{known}; only these architectures can be loaded from a single file")
    missing = min((c[2] for c in candidates), key=len)
    raise CheckpointError(f"{path}: {prefix}{missing[0]} is missing ({len(missing)} {component} tensors of {known} "
                          "are absent); the file is incomplete")


def _build_model(kind: str, component: str, source: str, weights: dict, torch_dtype):
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: filled from the file below, without a random init
        model = _new_model(_read_config(source, kind, component))
    converted = from_ldm(_layout_for(source, kind, component), weights)
    model_keys = set(model.state_dict())
    # Fresh copies: safetensors' tensors may sit at unaligned addresses, where CPU kernels take other code paths
    # (slower, and not bit-identical to the same weights elsewhere).
    converted = {k[len("text_model."):] if k not in model_keys and k.startswith("text_model.") else k:
                 v.to(dtype=torch_dtype if v.is_floating_point() else v.dtype, copy=True)
                 for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def _load_tokenizer(path: str, kind: str, index: int, source: str, tokenizer_dir):
    from transformers import CLIPTokenizer

    pad_token = TOKENIZER_PAD_TOKENS[kind][index]
    if source == "tiny":
        return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad_token)
    if source == "toy":
        from ..toyworld.model import TOY_DIR

        return CLIPTokenizer.from_pretrained(TOY_DIR / "tokenizer", pad_token=pad_token)
    repos = TOKENIZER_SOURCES[(kind, index)]
    folders = []
    if tokenizer_dir:  # sd-scripts' --tokenizer_cache_dir keeps each tokenizer in <dir>/<repo id with _ for />
        folders = [Path(tokenizer_dir) / repo.replace("/", "_") for repo, _ in repos]
        folders += [Path(tokenizer_dir) / ("tokenizer" if index == 0 else "tokenizer_2"), Path(tokenizer_dir)]
    places = [(str(folder), "") for folder in folders if (folder / "vocab.json").is_file()] + repos
    for name, subfolder in places:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(name, subfolder=subfolder or "", local_files_only=True,
                                                      pad_token=pad_token)
        except (OSError, ValueError):  # not in the cache (huggingface_hub's errors are OSErrors)
            continue
        if len(tokenizer) >= 49408:  # the full CLIP vocabulary, as the real text encoders expect
            return tokenizer
    raise CheckpointError(
        f"{path} is a full-size {REAL_MODEL_NAMES[kind]} model and its tokenizer is not available offline: none of "
        f"{', '.join(repo for repo, _ in repos)} is in the Hugging Face cache"
        + (f" and {tokenizer_dir} holds no CLIP tokenizer (vocab.json, merges.txt)" if tokenizer_dir else "")
        + f"; download it once (huggingface-cli download {repos[0][0]}) or pass a tokenizer folder "
        "(--tokenizer_cache_dir)")
