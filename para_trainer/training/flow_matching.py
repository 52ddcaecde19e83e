"""FLUX.1's training step as sd-scripts' flux_train_network.py takes it (flux-contract §3): flow matching.

x_t = (1 - σ)·latents + σ·noise, the transformer predicts the velocity noise - latents from packed 2x2 latent
patches with CLIP-L's pooled output, T5's hidden states and the guidance scale; σ is drawn as
--timestep_sampling says, the prediction post-processed as --model_prediction_type says.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")


def flow_scheduler(shift: float):
    """sd-scripts' training scheduler: diffusers' FlowMatchEulerDiscreteScheduler with --discrete_flow_shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, C·4): "b c (h 2) (w 2) -> b (h w) (c 2 2)"."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents for latents of (height, width)."""
    b, _, features = packed.shape
    c = features // 4
    return packed.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """(h·w, 3) positions of the packed patches: channel 1 the row, channel 2 the column (h, w: packed sizes)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def resolution_mu(sequence_length: int) -> float:
    """FLUX's shift for a packed sequence length: linear through (256, 0.5) and (4096, 1.15)."""
    slope = (1.15 - 0.5) / (4096 - 256)
    return slope * sequence_length + (0.5 - slope * 256)


def sample_sigmas(args, scheduler, batch: int, sequence_length: int, generators: list[torch.Generator]):
    """(σ in [0, 1], timesteps in [0, 1000]) per sample, as --timestep_sampling draws them; one draw per sample
    from its own generator, so a step is the same whatever the batch split."""
    normal = torch.cat([torch.randn(1, generator=g) for g in generators])
    uniform = torch.cat([torch.rand(1, generator=g) for g in generators])
    mode = args.timestep_sampling
    if mode == "uniform":
        sigmas = uniform
    elif mode in ("sigmoid", "shift", "flux_shift"):
        sigmas = torch.sigmoid(args.sigmoid_scale * normal)
        if mode == "shift":
            shift = args.discrete_flow_shift
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        elif mode == "flux_shift":
            sigmas = time_shift(resolution_mu(sequence_length), sigmas)
    else:  # "sigma": an index into the shifted scheduler's table, by --weighting_scheme's density
        if args.weighting_scheme == "logit_normal":
            u = torch.sigmoid(args.logit_mean + args.logit_std * normal)
        elif args.weighting_scheme == "mode":
            u = 1 - uniform - args.mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
        else:
            u = uniform
        index = (u * scheduler.config.num_train_timesteps).long().clamp(max=scheduler.config.num_train_timesteps - 1)
        timesteps = scheduler.timesteps[index]
        return scheduler.sigmas[index].float(), timesteps.float()
    return sigmas, sigmas * 1000


def loss_weighting(args, sigmas: torch.Tensor) -> torch.Tensor | None:
    """sd-scripts weights the loss only with --model_prediction_type sigma_scaled (by --weighting_scheme)."""
    if args.model_prediction_type != "sigma_scaled":
        return None
    if args.weighting_scheme == "sigma_sqrt":
        return sigmas ** -2.0
    if args.weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def encode_flux_prompts(models, captions: list[str], max_token_length: int, attention_mask: bool):
    """(CLIP-L pooled (B, 768), T5 hidden states (B, L, 4096), T5 attention mask or None)."""
    clip, t5 = models.text_encoders
    clip_tokenizer, t5_tokenizer = models.tokenizers
    clip_ids = clip_tokenizer(captions, padding="max_length", truncation=True, max_length=77,
                              return_tensors="pt").input_ids.to(clip.device)
    pooled = clip(clip_ids).pooler_output
    tokens = t5_tokenizer(captions, padding="max_length", truncation=True, max_length=max_token_length,
                          return_tensors="pt")
    mask = tokens.attention_mask.to(t5.device)
    hidden = t5(tokens.input_ids.to(t5.device), attention_mask=mask if attention_mask else None).last_hidden_state
    return pooled, hidden, (mask if attention_mask else None)


def flux_training_loss(args, models, scheduler, latents: torch.Tensor, encoded: tuple, loss_weights,
                       generators: list[torch.Generator], device) -> torch.Tensor:
    """One micro-batch's loss: sd-scripts' get_noise_pred_and_target + process_batch for FLUX. `encoded`:
    encode_flux_prompts' (CLIP-L pooled, T5 hidden states, T5 mask or None) for the batch's captions."""
    batch, _, height, width = latents.shape
    pooled, t5_hidden, mask = encoded
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
    sequence_length = (height // 2) * (width // 2)
    sigmas, timesteps = sample_sigmas(args, scheduler, batch, sequence_length, generators)
    sigmas, timesteps = sigmas.to(device), timesteps.to(device)
    noisy = (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
    transformer = models.unet
    dtype = transformer.dtype
    attention = None
    if mask is not None:  # --apply_t5_attn_mask: padding tokens of T5 are not attended to (image tokens always are)
        keys = torch.cat([mask.bool(), torch.ones(batch, sequence_length, dtype=torch.bool, device=device)], dim=1)
        attention = {"attention_mask": keys[:, None, None, :]}
    guidance = torch.full((batch,), float(args.guidance_scale), device=device) if models.has_guidance else None
    prediction = transformer(
        hidden_states=pack_latents(noisy).to(dtype), encoder_hidden_states=t5_hidden.to(dtype),
        pooled_projections=pooled.to(dtype), timestep=(timesteps / 1000).to(dtype), guidance=guidance,
        img_ids=image_ids(height // 2, width // 2).to(device), txt_ids=torch.zeros(t5_hidden.shape[1], 3, device=device),
        joint_attention_kwargs=attention, return_dict=False)[0]
    prediction = unpack_latents(prediction.float(), height, width)
    if args.model_prediction_type == "additive":
        prediction = prediction + noisy
    elif args.model_prediction_type == "sigma_scaled":
        prediction = prediction * (-sigmas[:, None, None, None]) + noisy
    target = noise - latents
    loss = (F.l1_loss if args.loss_type == "l1" else F.mse_loss)(prediction, target, reduction="none")
    weighting = loss_weighting(args, sigmas)
    if weighting is not None:
        loss = loss * weighting[:, None, None, None]
    return (loss.mean(dim=(1, 2, 3)) * loss_weights.to(device)).mean()
