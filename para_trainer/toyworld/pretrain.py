"""The recipe that builds ``toy-sd1`` from nothing, in stages, each resumable:

    data      render the pretraining images (held-out shape x background pairs and concepts never appear)
    vae       train the AutoencoderKL (L1 + edge + tiny KL): on 32 x 32 crops (most around the object), then on
              whole images, then on whole images half of which show the held-out concepts: like SD's VAE it is a
              general image codec (the UNet and the text encoder never see a concept)
    latents   encode every image once; the VAE's scaling_factor is set to 1 / std of the latents
    unet      train the UNet and the text encoder together on the cached latents (epsilon prediction, sd-scripts'
              noise schedule, Min-SNR weighting, 10% empty captions for classifier-free guidance, EMA weights),
              then, when the recipe has layout_steps, a layout phase: every caption names the position, timesteps
              from 500 up (where the layout of a picture is decided: at low noise the loss barely depends on
              where the object is)
    export    write the EMA weights as the fp16 diffusers folder that ships as builtin:toy-sd1

    para-trainer toyworld pretrain --workdir output/toyworld            # all stages; rerun to resume

Each stage writes its result under --workdir and is skipped when the result is there; a stage interrupted
mid-way continues from its last checkpoint (every ``checkpoint_every`` steps: tensors only, read back with
weights_only). Progress goes to the console and to ``pretrain.log``; each stage's wall time to ``timings.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from . import model as toy
from .checkpoints import resume, save_state
from .dataset import concept_scenes, rendered_set, scenes_from_json, world_scenes
from .world import caption

STAGES = ("data", "vae", "latents", "unet", "export")


@dataclass
class Recipe:
    images: int = 60000
    seed: int = 0
    vae_crop_steps: int = 4000
    vae_full_steps: int = 300
    vae_object_crop_rate: float = 0.7
    vae_mixed_steps: int = 600
    vae_concept_images: int = 10000
    vae_concept_rate: float = 0.5
    vae_batch: int = 32
    vae_lr: float = 8e-4
    vae_edge_weight: float = 0.5
    vae_kl_weight: float = 1e-6
    unet_steps: int = 13000
    unet_batch: int = 32
    unet_lr: float = 3e-4
    unet_warmup: int = 200
    empty_caption_rate: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    layout_steps: int = 1800  # a last UNet phase after unet_steps: see stage_unet
    layout_lr: float = 1e-4
    layout_min_timestep: int = 500
    layout_ema_decay: float = 0.99
    checkpoint_every: int = 250

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class Log:
    def __init__(self, workdir: Path):
        self.path = workdir / "pretrain.log"

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _record_time(workdir: Path, stage: str, since: float) -> float:
    """Add the seconds since ``since`` to the stage's wall time in timings.json (kept across interruptions, as
    each checkpoint records the time that led to it); return now."""
    now = time.time()
    path = workdir / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(timings.get(stage, 0) + now - since, 1)
    path.write_text(json.dumps(timings, indent=2) + "\n")
    return now


def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total))))


# --------------------------------------------------------------------------------------------------
# Stage data


def stage_data(workdir: Path, recipe: Recipe, log: Log) -> np.ndarray:
    scenes = world_scenes(recipe.images, recipe.seed)
    done = [0]

    def progress(n):
        done[0] += n
        log(f"data: {done[0]}/{len(scenes)} images rendered")

    return rendered_set(workdir / "data", "world", scenes, progress)


def load_scenes(workdir: Path):
    return scenes_from_json((workdir / "data" / "world-scenes.json").read_text())


# --------------------------------------------------------------------------------------------------
# Stage vae


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(vae, batch: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    posterior = vae.encode(batch).latent_dist
    decoded = vae.decode(posterior.sample()).sample
    loss = F.l1_loss(decoded, batch)
    for d_out, d_in in zip(_edges(decoded), _edges(batch)):
        loss = loss + recipe.vae_edge_weight * F.l1_loss(d_out, d_in)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return loss + recipe.vae_kl_weight * kl


def _crops(batch: torch.Tensor, scenes, object_rate: float, generator: torch.Generator) -> torch.Tensor:
    """A 32 x 32 crop of each image on the 4-pixel latent grid: around the object (most of the time, so that the
    small objects, not the large backgrounds, dominate the loss) or anywhere."""
    from .render import centre

    crops = []
    for image, scene in zip(batch, scenes):
        jitter = torch.randint(-4, 5, (2,), generator=generator).tolist()
        if float(torch.rand((), generator=generator)) < object_rate:
            cx, cy = centre(scene.position, scene.size)
            x, y = (min(32, max(0, round((c - 16 + j) / 4) * 4)) for c, j in ((cx, jitter[0]), (cy, jitter[1])))
        else:
            y, x = (torch.randint(0, 9, (2,), generator=generator) * 4).tolist()
        crops.append(image[:, y:y + 32, x:x + 32])
    return torch.stack(crops)


def vae_concept_images(workdir: Path, recipe: Recipe) -> np.ndarray:
    """Renders of the held-out concepts for the VAE's last phase (their own seed: not the judge's, not a study's)."""
    return rendered_set(workdir / "data", "vae-concepts", concept_scenes(recipe.vae_concept_images, seed=3))


def stage_vae(workdir: Path, recipe: Recipe, images: np.ndarray, scenes, log: Log):
    out_dir = workdir / "vae"
    if (out_dir / "config.json").exists():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(out_dir)
    state_path = workdir / "vae-state.pt"
    torch.manual_seed(recipe.seed)
    vae = toy.new_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    start, _ = resume(state_path, {"model": vae}, optimizer, log, "vae")
    total = recipe.vae_crop_steps + recipe.vae_full_steps + recipe.vae_mixed_steps
    pixels = torch.from_numpy(images)
    concepts = torch.from_numpy(vae_concept_images(workdir, recipe)) if recipe.vae_mixed_steps else None
    vae.train()
    began = mark = time.time()
    for step in range(start, total):
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * _cosine(step, total, 50)
        generator = torch.Generator().manual_seed(recipe.seed * 7919 + step)
        whole = step >= recipe.vae_crop_steps
        batch_size = recipe.vae_batch // 2 if whole else recipe.vae_batch
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        batch = pixels[index]
        if step >= recipe.vae_crop_steps + recipe.vae_full_steps:  # the mixed phase
            n = round(batch_size * recipe.vae_concept_rate)
            batch = torch.cat([batch[n:], concepts[torch.randint(0, len(concepts), (n,), generator=generator)]])
        batch = batch.permute(0, 3, 1, 2).float() / 127.5 - 1
        if not whole:
            batch = _crops(batch, [scenes[i] for i in index.tolist()], recipe.vae_object_crop_rate, generator)
        loss = vae_loss(vae, batch, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            rate = (time.time() - began) / (step + 1 - start)
            log(f"vae step {step + 1}/{total} loss {loss.item():.4f} ({rate:.2f} s/step, "
                f"{(total - step - 1) * rate / 60:.0f} min left)")
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == total:
            save_state({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, state_path)
            mark = _record_time(workdir, "vae", mark)
    vae.eval()
    vae.save_pretrained(out_dir)
    return vae


# --------------------------------------------------------------------------------------------------
# Stage latents


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's posterior for each image, unscaled."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        posterior = vae.encode(batch).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def stage_latents(workdir: Path, vae, images: np.ndarray, log: Log) -> dict[str, torch.Tensor]:
    path = workdir / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    vae.eval()
    mean, std = encode_images(vae, images)
    # The RMS of the means and standard deviations taken together: sqrt((E[mean²] + E[std²]) / 2). The posterior
    # std is tiny, so this is about RMS(latent) / sqrt(2) and scaled latents have an RMS of about 1.4, not 1 as SD's
    # 0.18215 gives. toy-sd1 was pretrained so; a rebuild keeps the formula to reproduce it (docs/toyworld.md).
    spread = float(torch.cat([mean, std]).float().pow(2).mean().sqrt())
    scaling = float(f"{1 / spread:.5g}")
    log(f"latents: {len(mean)} encoded, latent RMS {spread:.4f}, mean posterior std {float(std.mean()):.2e}, "
        f"scaling_factor {scaling}")
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(workdir / "vae")
    result = {"mean": mean.half(), "std": std.half(), "scaling_factor": torch.tensor(scaling)}
    save_state(result, path)
    return result


# --------------------------------------------------------------------------------------------------
# Stage unet


def noise_schedule():
    from ..models.loading import noise_scheduler

    return noise_scheduler(v_parameterization=False)


def stage_unet(workdir: Path, recipe: Recipe, latents: dict, scenes, log: Log):
    state_path = workdir / "unet-state.pt"
    torch.manual_seed(recipe.seed)
    unet, text_encoder = toy.new_unet(), toy.new_text_encoder()
    tokenizer = _tokenizer(workdir)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.01)
    start, state = resume(state_path, {"unet": unet, "text_encoder": text_encoder}, optimizer, log, "unet")
    ema = list(state["ema"]) if state else [p.detach().clone() for p in params]
    total = recipe.unet_steps + recipe.layout_steps
    if start >= total:
        return unet, text_encoder, ema
    scheduler = noise_schedule()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    mean, std = latents["mean"], latents["std"]
    scale = float(latents["scaling_factor"])
    unet.train()
    text_encoder.train()
    began, losses = time.time(), []
    mark = began
    for step in range(start, total):
        # The layout phase: every caption names the position, timesteps from layout_min_timestep up (where the
        # layout of a picture is decided), a constant learning rate and a shorter EMA.
        layout = step >= recipe.unet_steps
        lr = recipe.layout_lr if layout else recipe.unet_lr * _cosine(step, recipe.unet_steps, recipe.unet_warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(recipe.seed * 104729 + step)
        rng = random.Random(f"{recipe.seed}/{step}")
        index = torch.randint(0, len(mean), (recipe.unet_batch,), generator=generator)
        sample = mean[index].float() + std[index].float() * torch.randn(mean[index].shape, generator=generator)
        x0 = sample * scale
        always = ("position",) if layout else ()
        texts = ["" if rng.random() < recipe.empty_caption_rate else caption(scenes[i], rng, always)
                 for i in index.tolist()]
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=generator)
        low = recipe.layout_min_timestep if layout else 0
        t = torch.randint(low, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        context = text_encoder(ids).last_hidden_state
        pred = unet(noisy, t, context).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        weight = torch.clamp(snr[t], max=recipe.min_snr_gamma) / snr[t]
        loss = (per_sample * weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(recipe.layout_ema_decay if layout else recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            rate = (time.time() - began) / (step + 1 - start)
            log(f"unet step {step + 1}/{total} loss {np.mean(losses[-50:]):.4f} "
                f"({rate:.2f} s/step, {(total - step - 1) * rate / 60:.0f} min left)")
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == total:
            save_state({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                          "optimizer": optimizer.state_dict(), "ema": ema, "step": step + 1}, state_path)
            mark = _record_time(workdir, "unet", mark)
    return unet, text_encoder, ema


def _tokenizer(workdir: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(toy.write_tokenizer(workdir / "tokenizer"))


def ema_models(workdir: Path):
    """The UNet and text encoder with the EMA weights of the last UNet checkpoint (float32, eval mode)."""
    state = torch.load(workdir / "unet-state.pt", weights_only=True)
    unet, text_encoder = toy.new_unet(), toy.new_text_encoder()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    with torch.no_grad():
        for p, e in zip(params, state["ema"]):
            p.copy_(e)
    return unet.eval(), text_encoder.eval(), int(state["step"])


# --------------------------------------------------------------------------------------------------
# Stage export


def build_pipeline(workdir: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    unet, text_encoder, _ = ema_models(workdir)
    vae = AutoencoderKL.from_pretrained(workdir / "vae").eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(workdir), unet=unet,
                                   scheduler=DDIMScheduler.from_config(toy.SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stage_export(workdir: Path, recipe: Recipe, out: Path, log: Log) -> Path:
    from transformers.utils import logging as transformers_logging

    pipe = build_pipeline(workdir)
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    transformers_logging.disable_progress_bar()
    pipe.save_pretrained(tmp, safe_serialization=True)
    toy.write_tokenizer(tmp / "tokenizer")  # the generator's exact bytes
    timings = json.loads((workdir / "timings.json").read_text()) if (workdir / "timings.json").exists() else {}
    (tmp / "recipe.json").write_text(json.dumps({"recipe": asdict(recipe), "timings_s": timings}, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"export: wrote {out} ({size / 2**20:.1f} MiB)")
    return out


# --------------------------------------------------------------------------------------------------


def run(workdir, stages=STAGES, out=toy.TOY_DIR, recipe: Recipe | None = None, threads: int | None = None) -> None:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    recipe_path = workdir / "recipe.json"
    if recipe is None:
        recipe = Recipe.from_dict(json.loads(recipe_path.read_text())) if recipe_path.exists() else Recipe()
    recipe_path.write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    log = Log(workdir)
    log(f"pretrain: stages {', '.join(stages)} in {workdir} ({torch.get_num_threads()} threads)")
    images = vae = latents = None
    for stage in STAGES:
        if stage not in stages:
            continue
        began = time.time()
        if stage in ("data", "vae", "latents") and images is None:
            images = stage_data(workdir, recipe, log)
        if stage in ("vae", "latents") and vae is None:
            vae = stage_vae(workdir, recipe, images, load_scenes(workdir), log)
        if stage == "latents":
            cached_latents = (workdir / "latents.pt").exists()
            latents = stage_latents(workdir, vae, images, log)
        if stage == "unet":
            latents = latents or torch.load(workdir / "latents.pt", weights_only=True)
            stage_unet(workdir, recipe, latents, load_scenes(workdir), log)
        if stage == "export":
            stage_export(workdir, recipe, Path(out), log)
        if stage in ("data", "latents", "export") and not (stage == "latents" and cached_latents):
            _record_time(workdir, stage, began)
