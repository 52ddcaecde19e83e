"""The metadata sd-scripts writes into every adapter file: ss_* keys and ModelSpec 1.0.1 (kohya-contract §3)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time

import torch

from .. import __version__
from ..models.loading import IMPLEMENTATIONS

# What sd-scripts keeps with --no_metadata.
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")

def legacy_model_hash(path: str) -> str:
    """The old webui model hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    if os.path.isdir(path):
        return "IsADirectory"
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def file_sha256(path: str) -> str:
    if os.path.isdir(path):
        return "IsADirectory"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


FLUX_METADATA = ("apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale",
                 "timestep_sampling", "sigmoid_scale", "model_prediction_type", "discrete_flow_shift", "model_type")


def training_metadata(args, models, dataset, net_kwargs: dict, optimizer_description: str, session_id: int,
                      training_started_at: float, num_batches_per_epoch: int, num_epochs: int) -> dict[str, str]:
    """ss_* keys known when training starts; save adds ss_training_finished_at, ss_steps, ss_epoch."""
    te_lr = args.text_encoder_lr[0] if isinstance(args.text_encoder_lr, (list, tuple)) and args.text_encoder_lr \
        else args.text_encoder_lr
    metadata = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": te_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": dataset.num_train_images,
        "ss_num_validation_images": 0,
        "ss_num_reg_images": dataset.num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_v2": models.kind == "sd2",
        "ss_base_model_version": models.base_model_version,
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": bool(args.cache_latents),
        "ss_seed": args.seed,
        "ss_lowram": args.lowram,
        "ss_noise_offset": args.noise_offset,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_training_comment": args.training_comment,
        "ss_sd_scripts_commit_hash": "(unknown)",
        "ss_optimizer": optimizer_description,
        "ss_loss_type": args.loss_type,
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_min_timestep": args.min_timestep,
        "ss_max_timestep": args.max_timestep,
        "ss_tag_frequency": json.dumps(dataset.tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs),
        "para_trainer.version": __version__,
    }
    if models.kind == "flux":  # FluxNetworkTrainer.update_metadata's keys
        metadata.update({f"ss_{name}": getattr(args, name) for name in FLUX_METADATA})
    if args.dataset_config:
        metadata["ss_datasets"] = json.dumps(dataset.subset_summaries())
    else:
        metadata.update({
            "ss_batch_size_per_device": args.train_batch_size,
            "ss_total_batch_size": args.train_batch_size * args.gradient_accumulation_steps,
            "ss_resolution": args.resolution,
            "ss_flip_aug": args.flip_aug,
            "ss_random_crop": args.random_crop,
            "ss_shuffle_caption": args.shuffle_caption,
            "ss_enable_bucket": bool(args.enable_bucket),
            "ss_bucket_no_upscale": bool(args.bucket_no_upscale),
            "ss_min_bucket_reso": args.min_bucket_reso,
            "ss_max_bucket_reso": args.max_bucket_reso,
            "ss_keep_tokens": args.keep_tokens,
            "ss_reg_dataset_dirs": json.dumps(dataset.reg_dataset_dirs),
            "ss_bucket_info": json.dumps(dataset.bucket_info),
        })
    if net_kwargs:
        metadata["ss_network_args"] = json.dumps(net_kwargs)
    source = models.source
    if os.path.exists(source):
        metadata["ss_sd_model_name"] = os.path.basename(os.path.normpath(source))
        metadata["ss_sd_model_hash"] = legacy_model_hash(source)
        metadata["ss_new_sd_model_hash"] = file_sha256(source)
    else:
        metadata["ss_sd_model_name"] = source
    if args.vae:
        metadata["ss_vae_name"] = os.path.basename(os.path.normpath(args.vae))
        if os.path.exists(args.vae):
            metadata["ss_vae_hash"] = legacy_model_hash(args.vae)
            metadata["ss_new_vae_hash"] = file_sha256(args.vae)
    metadata = {key: str(value) for key, value in metadata.items()}
    if args.no_metadata:
        metadata = {key: value for key, value in metadata.items() if key in MINIMUM_KEYS}
    return metadata


def modelspec(args, models, timestamp: float) -> dict[str, str]:
    """ModelSpec 1.0.1 keys of an sd-scripts LoRA file (kohya-contract §3.3)."""
    version = models.base_model_version
    if args.resolution:
        sizes = [int(s) for s in str(args.resolution).split(",")]
        resolution = f"{sizes[0]}x{sizes[-1]}"
    else:
        resolution = {"sdxl_base_v1-0": "1024x1024", "sd_v2_v": "768x768"}.get(version, "512x512")
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{models.architecture}/lora",
        "modelspec.implementation": IMPLEMENTATIONS.get(version, "diffusers"),
        "modelspec.implementation_version": f"para-trainer/{__version__}",
        "modelspec.title": args.metadata_title or args.output_name or f"PaRa@{int(timestamp)}",
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.datetime.fromtimestamp(timestamp).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if models.v_parameterization else "epsilon",
    }
    if models.kind == "flux":
        del spec["modelspec.prediction_type"]  # sd-scripts writes none for FLUX
    if args.min_timestep is not None or args.max_timestep is not None:
        spec["modelspec.timestep_range"] = f"{args.min_timestep or 0},{args.max_timestep or 1000}"
    if args.clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(args.clip_skip)
    for field in ("author", "description", "license", "tags", "usage_hint", "trigger_phrase", "merged_from",
                  "preprocessor", "is_negative_embedding"):
        value = getattr(args, f"metadata_{field}", None)
        if value:
            spec[f"modelspec.{field}"] = str(value)
    return spec


def at_save(metadata: dict[str, str], steps: int, epoch: int) -> dict[str, str]:
    return dict(metadata, ss_training_finished_at=str(time.time()), ss_steps=str(steps), ss_epoch=str(epoch))


# The base model an adapter was trained on: its LoRA export is exact only there
FINGERPRINT_KEY = "para.base_fingerprint"


def base_fingerprint(layers, dtype: torch.dtype | None = None) -> str:
    """sha256 over the base weights of the adapted layers: names sorted, each weight as float32 bytes.

    `layers`: objects with `.lora_name` and `.layer` (a network's adapter modules, or TargetLayers), or a dict
    name -> layer or weight tensor. `dtype` rounds the weights to it first (what a model cast to fp16/bf16
    for training holds), so a fingerprint taken on such a model can be checked against the float32 base.
    """
    items = layers.items() if isinstance(layers, dict) else ((t.lora_name, t.layer) for t in layers)
    digest = hashlib.sha256()
    for name, weight in sorted(items, key=lambda item: item[0]):
        w = getattr(weight, "weight", weight).detach()
        if dtype is not None:
            w = w.to(dtype)
        w = w.to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(w.shape)}\n".encode())
        digest.update(w.numpy())
    return digest.hexdigest()
