"""The trainer behind train_para.py: sd-scripts' train_network.py interface, read top to bottom.

    config  ->  data  ->  models  ->  network  ->  optimizer  ->  loop  ->  save

Every random draw for a sample (caption shuffle, flip, latent sample, noise, timestep) comes from a generator
seeded by (seed, epoch, image, occurrence), so a run stopped and resumed ends with the same adapter, and a step
gives the same result whether its images run in one process or several, in one batch or in two.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import hashlib
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from networks.adapter_base import rename_modules, renames_for_network, standardize_module_names

from ..files import metadata as file_metadata
from ..files.export import lora_export_path
from ..models.loading import ModelError, encode_prompts, load_models, noise_scheduler, sdxl_time_ids
from ..paths import file_in_the_way
from .args import ArgsError, check_model_options, parse_args
from .data import DataError, TrainDataset, load_blueprints
from .flow_matching import encode_flux_prompts, flow_scheduler, flux_training_loss
from .optimizers import OptimizerError, build_optimizer
from .text_cache import build_cache, cached_outputs, dataset_captions

logger = logging.getLogger("para_trainer")


class TrainError(RuntimeError):
    """A setting that cannot work, found before training starts (or a failure that must stop it)."""


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean the user's input is wrong: printed as one message, exit code 2."""
    from networks.adapter_base import AdapterFileError, NetworkArgsError

    from networks.para import ParaRankLossError

    from ..models.checkpoint import CheckpointError
    from ..hub import HubError
    from ..models.sampling import SamplingError

    return (ArgsError, DataError, ModelError, OptimizerError, TrainError, NetworkArgsError, AdapterFileError,
            CheckpointError, SamplingError, ParaRankLossError, HubError)


@dataclass
class RunStatus:
    """Where a run stands, for the one line Ctrl-C prints: the last finished step and the last state saved."""

    step: int | None = None
    last_state: str | None = None

    def interrupted(self) -> str:
        if self.step is None:
            return "interrupted before training started; no adapter was written"
        where = f"interrupted at step {self.step}"
        if self.last_state:
            return f"{where}; last saved state {self.last_state} (continue with --resume {self.last_state})"
        return f"{where}; no state was saved, so the run cannot be resumed (--save_state saves one)"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from .optimizers import keep_bitsandbytes_offline

    keep_bitsandbytes_offline()  # whoever imports bitsandbytes (diffusers does): no Hub access, no warning
    status = RunStatus()
    try:
        train(parse_args(argv), status)
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{status.interrupted()}", file=sys.stderr)
        return 130
    return 0


# --------------------------------------------------------------------------------------------------
# 1. config: settings that cannot work stop here, before anything is loaded or written


def check_settings(args) -> None:
    if args.xformers:
        if not torch.cuda.is_available():
            raise TrainError("--xformers needs a CUDA GPU (xformers runs only on CUDA); on this machine use --sdpa "
                             "(PyTorch's memory-efficient scaled-dot-product attention) instead")
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise TrainError("--xformers: xformers is not installed (pip install 'para-trainer[xformers]'), or use "
                             "--sdpa") from None
    if not args.output_dir:
        raise TrainError("--output_dir is required: where the adapter, samples and log go")
    blocking = file_in_the_way(args.output_dir)
    if blocking:
        raise TrainError(f"--output_dir {args.output_dir}: {blocking} is a file, not a folder; choose another "
                         "--output_dir")
    if args.resume and not os.path.isfile(os.path.join(args.resume, "train_state.json")):
        raise TrainError(f"--resume {args.resume}: not a state folder written by --save_state (no train_state.json)")
    if args.sample_prompts and not os.path.isfile(args.sample_prompts):
        raise TrainError(f"--sample_prompts {args.sample_prompts}: file not found")
    for path in (args.network_weights, *(args.base_weights or [])):
        if path and not os.path.isfile(path):
            raise TrainError(f"adapter file not found: {path}")


def check_precision(args, accelerator) -> None:
    """Say what runs when it is not what was asked: accelerate runs --mixed_precision fp16 on a CPU as float32.
    The run then records "no" (what ran), not fp16, in the file's ss_mixed_precision."""
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu" and not args.full_fp16:
        logger.warning("--mixed_precision fp16: there is no CUDA GPU here, and accelerate runs fp16 on a CPU as "
                       "float32; this run trains in float32 and the file records mixed precision 'no' (bf16 does "
                       "run on a CPU)")
        args.mixed_precision = "no"


@dataclass
class Plan:
    """How many steps and epochs, given the data, processes and accumulation."""

    batches_per_epoch: int
    processes: int
    accumulation: int
    max_train_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.batches_per_epoch / (self.processes * self.accumulation)))

    @property
    def epochs(self) -> int:
        return math.ceil(self.max_train_steps / self.steps_per_epoch)

    def batch_indices(self, step: int, process: int) -> tuple[int, list[int]]:
        """(epoch, this process's batch indices for each micro-step of optimizer step `step`)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        first = in_epoch * self.accumulation * self.processes
        indices = [(first + micro * self.processes + process) % self.batches_per_epoch
                   for micro in range(self.accumulation)]
        return epoch, indices


def seeded_generator(*key) -> torch.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def item_generators(seed: int, epoch: int, batches: list) -> list[list[torch.Generator]]:
    """One generator per sample, keyed by the image and how often it came before in this epoch (repeats),
    not by its batch: the same draws whatever the batch size or number of processes."""
    seen: Counter = Counter()
    generators = []
    for batch in batches:
        row = []
        for ref in batch:
            row.append(seeded_generator("sample", seed, epoch, tuple(ref), seen[ref]))
            seen[ref] += 1
        generators.append(row)
    return generators


# --------------------------------------------------------------------------------------------------
# The whole run


def train(args, status: RunStatus | None = None) -> None:
    from ..hub import prepare_training

    hub_uploads = prepare_training(args)  # token and repo checked, hf:// inputs downloaded, before anything else
    check_settings(args)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a second run in one process (tests, notebooks) may change mixed precision

    # Several processes without CUDA (accelerate launch --multi_gpu / torchrun on a CPU machine): gloo on CPU.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=multi_cpu,
                              log_with="tensorboard" if args.log_with else None,
                              project_dir=args.logging_dir)
    main_process = accelerator.is_main_process
    check_precision(args, accelerator)
    args.network_module = args.network_module or "networks.para"
    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    if args.resume:  # the run's seed decides every step's randomness: take the original one
        with open(os.path.join(args.resume, "train_state.json"), encoding="utf-8") as f:
            seed = json.load(f)["seed"]
    torch.manual_seed(seed)

    # 2. data
    dataset = TrainDataset(load_blueprints(args))

    # 3. models
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    models = load_models(args)
    check_model_options(args, models.kind)
    dataset.check_bucket_reso_steps(32 if models.is_sdxl or models.kind == "flux" else 64)
    setup_attention(args, models)
    device = accelerator.device
    place_models(args, models, weight_dtype, device)
    scheduler = flow_scheduler(args.discrete_flow_shift) if models.kind == "flux" else \
        noise_scheduler(models.v_parameterization)

    # 4. network
    network, net_kwargs, train_text_encoder = build_network(args, models, weight_dtype, device)
    if args.fp8_base or args.fp8_base_unet:
        store_base_in_fp8(network, models, weight_dtype)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for te in models.text_encoders:
            te.gradient_checkpointing_enable()
        network.enable_gradient_checkpointing()

    # 5. optimizer and learning-rate schedule
    te_lr = args.text_encoder_lr
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(
            te_lr if isinstance(te_lr, (list, tuple)) else [te_lr], args.unet_lr, args.learning_rate)
    else:
        groups, descriptions = network.prepare_optimizer_params(
            te_lr[0] if isinstance(te_lr, (list, tuple)) and te_lr else te_lr, args.unet_lr, args.learning_rate)
    if not groups:
        raise TrainError("nothing to train: every learning rate is 0 or no layer was adapted")
    optimizer, optimizer_description = build_optimizer(args, groups, args.learning_rate)
    # --full_fp16/--full_bf16 put the base model in half precision; the adapter's B stays float32: it is small, and
    # Adam's second moments underflow in fp16 (B turned NaN after one step on CPU when it was cast).
    plan = Plan(dataset.num_batches_per_epoch, accelerator.num_processes, args.gradient_accumulation_steps, 0)
    plan.max_train_steps = args.max_train_epochs * plan.steps_per_epoch if args.max_train_epochs \
        else args.max_train_steps
    lr_scheduler = build_lr_scheduler(args, optimizer, plan.max_train_steps)
    optimizer = accelerator.prepare(optimizer)  # loss scaling under fp16; the network is synced by hand below
    network.prepare_grad_etc(models.text_encoder_for_network, models.unet)

    # 6. latents and text-encoder outputs cached once, if asked
    if (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk) and not train_text_encoder:
        cache_text_encoder_outputs(args, models, dataset)
    if args.cache_latents or args.cache_latents_to_disk:
        with torch.no_grad():
            dataset.cache_latents(lambda images: encode_images(models, images, None), args.cache_latents_to_disk,
                                  args.vae_batch_size or 1)

    # resume
    start_step = 0
    if args.resume:
        start_step = load_train_state(args.resume, network, optimizer, lr_scheduler)
        logger.info("resumed from %s at step %d", args.resume, start_step)

    started_at = time.time()
    training_metadata = file_metadata.training_metadata(
        args, models, dataset, net_kwargs, optimizer_description, session_id=random.randint(0, 2**31 - 1),
        training_started_at=started_at, num_batches_per_epoch=plan.steps_per_epoch * args.gradient_accumulation_steps,
        num_epochs=plan.epochs)
    training_metadata["ss_seed"] = str(seed)
    spec = file_metadata.modelspec(args, models, started_at)
    prompts = read_prompts(args)  # a bad prompt file stops here, before any file is written
    output = OutputFiles(args, main_process, status or RunStatus())
    if main_process:
        output.start_log(start_step)
        accelerator.init_trackers(args.log_tracker_name or "network_train") if args.log_with else None
        logger.info("training %d steps (%d epochs of %d steps), %d images, batch %d x %d processes x %d accumulation",
                    plan.max_train_steps, plan.epochs, plan.steps_per_epoch, dataset.num_train_images,
                    args.train_batch_size, plan.processes, plan.accumulation)

    def save(step: int, epoch: int, final: bool) -> None:
        file_meta = dict(file_metadata.at_save(training_metadata, step, epoch), **spec)
        output.save_adapter(network, file_meta, step, epoch, final, models)
        state_saved = bool(args.save_state or (final and args.save_state_on_train_end))
        if state_saved:
            output.save_state(network, optimizer, lr_scheduler, step, epoch, seed, final)
        if main_process:  # sd-scripts pushes every save; the final one waits for the last samples
            hub_uploads.saved(output.adapter_path(step, epoch, final),
                              output.state_path(step, epoch, final) if state_saved else None, final)

    def sample(step: int, epoch: int, tag: str) -> list:
        return draw_samples(network, models, prompts, args, tag) if prompts and main_process else []

    # 7. the loop
    first_samples = (draw_samples(network, models, prompts, args, "000000", base=not args.network_weights)
                     if prompts and main_process and args.sample_at_first and start_step == 0 else [])
    from tqdm.auto import tqdm

    progress = tqdm(range(start_step, plan.max_train_steps), initial=start_step, total=plan.max_train_steps,
                    disable=not main_process, desc="steps")
    epoch = start_step // plan.steps_per_epoch
    network.on_epoch_start(models.text_encoder_for_network, models.unet)
    recent_losses: list[float] = []
    epoch_generators: tuple = (None, [])
    for step in progress:
        epoch, batch_indices = plan.batch_indices(step, accelerator.process_index)
        if step % plan.steps_per_epoch == 0 and step != start_step:
            network.on_epoch_start(models.text_encoder_for_network, models.unet)
        batches = dataset.batches_for_epoch(epoch, seed)
        if epoch_generators[0] != epoch:
            epoch_generators = (epoch, item_generators(seed, epoch, batches))
        network.on_step_start(models.text_encoder_for_network, models.unet)
        step_loss = 0.0
        for batch_index in batch_indices:
            generators = epoch_generators[1][batch_index]
            batch = load_samples(dataset, batches[batch_index], generators)
            torch.manual_seed(int(seeded_generator("dropout", seed, epoch, batch_index).initial_seed()))
            with accelerator.autocast():
                loss = training_loss(args, models, scheduler, batch, generators, train_text_encoder, device)
            accelerator.backward(loss / plan.accumulation)
            step_loss += loss.item() / plan.accumulation
        average_gradients(network, accelerator)
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(list(network.get_trainable_params()), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if args.scale_weight_norms:
            network.apply_max_norm_regularization(args.scale_weight_norms, device)

        done = step + 1
        recent_losses = (recent_losses + [step_loss])[-10:]
        lr = lr_scheduler.get_last_lr()[0]
        progress.set_postfix(loss=f"{sum(recent_losses) / len(recent_losses):.4f}", lr=f"{lr:.2e}")
        if main_process:
            output.log_step(done, epoch + 1, step_loss, lr)
            if args.log_with:
                accelerator.log({f"lr/{d}": l for d, l in zip(descriptions, lr_scheduler.get_last_lr())}
                                | {"loss/current": step_loss}, step=done)
        end_of_epoch = done % plan.steps_per_epoch == 0
        if done < plan.max_train_steps:
            if args.save_every_n_steps and done % args.save_every_n_steps == 0:
                save(done, epoch + 1, final=False)
            elif end_of_epoch and args.save_every_n_epochs and (epoch + 1) % args.save_every_n_epochs == 0:
                save(done, epoch + 1, final=False)
            if args.sample_every_n_steps and done % args.sample_every_n_steps == 0:
                sample(done, epoch + 1, f"{done:06d}")
            elif end_of_epoch and args.sample_every_n_epochs and (epoch + 1) % args.sample_every_n_epochs == 0:
                sample(done, epoch + 1, f"e{epoch + 1:06d}")
    progress.close()

    # 8. save
    final_epoch = math.ceil(plan.max_train_steps / plan.steps_per_epoch)
    accelerator.wait_for_everyone()
    save(plan.max_train_steps, final_epoch, final=True)
    last_samples = []
    if args.sample_prompts and (args.sample_every_n_steps or args.sample_every_n_epochs):
        last_samples = sample(plan.max_train_steps, final_epoch, f"{plan.max_train_steps:06d}")
    if main_process:
        output.finish()
        judge_report(args, models, dataset, prompts, first_samples, last_samples)
    accelerator.end_training()
    hub_uploads.finish()  # the final push; raises HubError if any upload failed (the files are all saved)


# --------------------------------------------------------------------------------------------------
# Pieces of the run


def setup_attention(args, models) -> None:
    if models.kind == "flux":  # diffusers' FLUX attention runs PyTorch SDPA; xformers through its backend switch
        if args.xformers:
            models.unet.set_attention_backend("xformers")
        return
    if args.xformers:
        models.unet.enable_xformers_memory_efficient_attention()
        models.vae.enable_xformers_memory_efficient_attention()
    elif args.mem_eff_attn:
        models.unet.set_attention_slice("auto")  # sliced attention: same result, less peak memory
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        models.unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA (what --sdpa asks for)


def place_models(args, models, weight_dtype, device) -> None:
    """The models on the device in their training precision: --full_fp16/bf16 casts the UNet (transformer) and text
    encoders (--fp8_base: store_base_in_fp8, once the network exists)."""
    for model in (models.unet, *models.text_encoders):
        model.to(device, weight_dtype if (args.full_fp16 or args.full_bf16) else None)
    models.vae.to(device, torch.float32 if args.no_half_vae else None)


def store_base_in_fp8(network, models, weight_dtype) -> None:
    """--fp8_base: the UNet's (transformer's) weights kept in fp8, each layer's upcast while it runs (diffusers'
    layerwise casting). Done after the network recorded the full-precision base's fingerprint (its LoRA export is
    exact for that base), and under the network's hooks: unhooked, cast, hooked again, so that a hooked layer's
    own forward (and each part of a stacked FLUX layer) upcasts before PaRa reads its output."""
    network.restore()
    models.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=weight_dtype)
    network.apply_to(models.text_encoder_for_network, models.unet, True, True)


def load_network_weights(network, path: str):
    """network.load_weights(path); a file with sd-scripts' text-encoder names loads into a network module that names
    them otherwise (LyCORIS under transformers 5) through a renamed temporary copy."""
    renames = {}
    if path.endswith(".safetensors"):
        renames = renames_for_network(path, {key.partition(".")[0] for key in network.state_dict()})
    if not renames:
        return network.load_weights(path)
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, os.path.basename(path))
        rename_modules(path, renames, copy)
        return network.load_weights(copy)


def build_network(args, models, weight_dtype, device):
    """The network module (sd-scripts' way), --base_weights merged first, --network_weights loaded after."""
    module_name = args.network_module or "networks.para"
    try:
        network_module = importlib.import_module(module_name)
    except ImportError as error:
        raise TrainError(f"--network_module {module_name}: cannot import it ({error})") from None
    text_encoder, unet = models.text_encoder_for_network, models.unet
    for i, path in enumerate(args.base_weights or []):
        multipliers = args.base_weights_multiplier or []
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        base_network, weights = network_module.create_network_from_weights(
            multiplier, path, models.vae, text_encoder, unet, for_inference=True)
        base_network.merge_to(text_encoder, unet, weights, weight_dtype, device)
        logger.info("merged --base_weights %s (multiplier %s)", path, multiplier)

    net_kwargs = {}
    for item in args.network_args or []:
        if "=" not in item:
            raise TrainError(f"--network_args item {item!r} is not key=value")
        key, value = item.split("=", 1)
        net_kwargs[key] = value
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = args.network_dropout  # as sd-scripts does, for LyCORIS-style modules
    if args.dim_from_weights:
        network, _ = network_module.create_network_from_weights(1, args.network_weights, models.vae, text_encoder,
                                                                unet, **net_kwargs)
    else:
        network = network_module.create_network(1.0, args.network_dim, args.network_alpha, models.vae, text_encoder,
                                                unet, neuron_dropout=args.network_dropout, **net_kwargs)
    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = not args.network_train_unet_only
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    if args.network_weights:
        info = load_network_weights(network, args.network_weights)
        logger.info("loaded --network_weights %s: %s", args.network_weights, info)
    network.to(device)
    if hasattr(network, "file_metadata"):  # which base the adapter belongs to: its LoRA export is exact only there
        from ..files.metadata import FINGERPRINT_KEY, base_fingerprint

        network.file_metadata[FINGERPRINT_KEY] = base_fingerprint(network.adapter_modules)
    train_text_encoder = train_text_encoder and bool(getattr(network, "text_encoder_modules", True))
    return network, net_kwargs, train_text_encoder


def build_lr_scheduler(args, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    warmup = args.lr_warmup_steps or 0
    # sd-scripts: a value below 1 (or "10%") is a ratio of the run
    warmup = int(warmup * total_steps) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, num_cycles=args.lr_scheduler_num_cycles or 1,
                         power=args.lr_scheduler_power or 1.0)


def load_samples(dataset, refs, generators) -> dict:
    """A batch whose every sample drew its caption shuffle, flip and crop from its own generator."""
    samples = [dataset.load_batch([ref], generator) for ref, generator in zip(refs, generators)]
    batch = {"captions": [c for s in samples for c in s["captions"]],
             "loss_weights": torch.cat([s["loss_weights"] for s in samples])}
    key = "latents" if "latents" in samples[0] else "images"
    batch[key] = torch.cat([s[key] for s in samples])
    return batch


def per_sample_normal(shape, generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])


def encode_images(models, images: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Latents of images in [-1, 1]: the VAE's mean, or a sample with each image's own generator."""
    vae = models.vae
    distribution = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    if generators is None:
        latents = distribution.mean
    else:
        latents = distribution.mean + distribution.std * per_sample_normal(distribution.mean.shape, generators).to(
            distribution.mean.device, distribution.mean.dtype)
    return (latents - models.latent_shift) * models.latent_scale  # FLUX's AE has a shift, SD's VAE none


def training_loss(args, models, scheduler, batch: dict, generators: list[torch.Generator], train_text_encoder: bool,
                  device) -> torch.Tensor:
    """One micro-batch's loss: sd-scripts' noise prediction loss with prior weights, noise offset and min-SNR
    (FLUX: its flow-matching loss)."""
    with torch.no_grad():
        latents = batch["latents"] if "latents" in batch else encode_images(models, batch["images"], generators)
    latents = latents.to(device, torch.float32)
    if models.kind == "flux":
        with torch.set_grad_enabled(train_text_encoder):
            encoded = encode_captions(args, models, batch["captions"], device)
        return flux_training_loss(args, models, scheduler, latents, encoded, batch["loss_weights"], generators, device)
    with torch.set_grad_enabled(train_text_encoder):
        hidden, added = encode_captions(args, models, batch["captions"], device)
    batch_size = latents.shape[0]
    noise = per_sample_normal(latents.shape, generators).to(device)
    if args.noise_offset:
        noise = noise + args.noise_offset * per_sample_normal((batch_size, latents.shape[1], 1, 1), generators).to(
            device)
    low, high = args.min_timestep or 0, args.max_timestep or scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(low, high, (1,), generator=g) for g in generators]).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if added is not None:
        height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
        added["time_ids"] = sdxl_time_ids(height, width, batch_size, device)
    dtype = models.unet.dtype  # fp16/bf16 with --full_fp16/--full_bf16, where autocast may not cover the CPU
    if added is not None:
        added = {key: value.to(dtype) for key, value in added.items()}
    prediction = models.unet(noisy.to(dtype), timesteps, hidden.to(dtype), added_cond_kwargs=added).sample.float()
    target = scheduler.get_velocity(latents, noise, timesteps) if models.v_parameterization else noise
    loss = (F.l1_loss if args.loss_type == "l1" else F.mse_loss)(prediction, target, reduction="none")
    loss = loss.mean(dim=(1, 2, 3)) * batch["loss_weights"].to(device)
    if args.min_snr_gamma:
        alphas = scheduler.alphas_cumprod.to(device)[timesteps]
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=args.min_snr_gamma) / (snr + 1 if models.v_parameterization else snr)
        loss = loss * weight
    return loss.mean()


def cache_text_encoder_outputs(args, models, dataset) -> None:
    """Every caption encoded once; the text encoders leave the device (back on it only while samples are drawn)."""
    models.prompt_cache = build_cache(dataset_captions(dataset), lambda c: encode_captions(args, models, c))
    for te in models.text_encoders:
        te.to("cpu")


def encode_captions(args, models, captions: list[str], device=None):
    """The text encoders' outputs for the captions (from --cache_text_encoder_outputs' cache when there is one):
    SD (hidden states, SDXL's added kwargs or None); FLUX (CLIP-L pooled, T5 hidden states, T5 mask or None)."""
    cache = getattr(models, "prompt_cache", None)
    if cache is not None:
        return cached_outputs(cache, captions, device)
    if models.kind == "flux":
        return encode_flux_prompts(models, captions, args.t5xxl_max_token_length or models.default_t5_max_length,
                                   args.apply_t5_attn_mask)
    return encode_prompts(models, captions, args.clip_skip, args.max_token_length)


def average_gradients(network, accelerator) -> None:
    """All-reduce the adapter's gradients (mean over processes): the network is not DDP-wrapped, its forward runs
    inside the UNet's layers."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for p in network.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= accelerator.num_processes


def read_prompts(args):
    if not args.sample_prompts:
        return []
    from ..models.sampling import read_prompt_file

    return read_prompt_file(args.sample_prompts)


# --------------------------------------------------------------------------------------------------
# Files: adapter, state, log — written by the main process only, each through a temporary name


SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def writing(path: str):
    """An OSError while writing `path` (full or read-only disk, a path under a file) as one TrainError naming it.
    Every file is written through a temporary name, so nothing is left under the final one."""
    try:
        yield
    except OSError as error:
        raise TrainError(f"could not write {path}: {error.strerror or error}; nothing was left under that name "
                         "(free some space, or choose another --output_dir)") from None


class OutputFiles:
    def __init__(self, args, main_process: bool, status: RunStatus):
        self.args = args
        self.main = main_process
        self.status = status
        self.name = args.output_name or "last"
        self.ext = "." + (args.save_model_as or "safetensors")
        self.log_path = os.path.join(args.output_dir, f"{self.name}_train_log.csv")
        self.written: list[str] = []

    def start_log(self, start_step: int = 0) -> None:
        """A new log, or on resume the old one up to the resumed step (steps after it run again and are logged
        again, once). Temporary files a killed run left in the folder are removed first."""
        with writing(self.args.output_dir):
            os.makedirs(self.args.output_dir, exist_ok=True)
        remove_stale_temporaries(self.args.output_dir)
        rows = []
        if start_step and os.path.isfile(self.log_path):
            with open(self.log_path, encoding="utf-8") as f:
                rows = [line for line in f.read().splitlines()[1:]
                        if line.split(",")[0].isdigit() and int(line.split(",")[0]) <= start_step]
        temp = self.log_path + ".tmp"
        with writing(self.log_path):
            with open(temp, "w", encoding="utf-8") as f:
                f.write("\n".join(["step,epoch,loss,lr", *rows]) + "\n")
            os.replace(temp, self.log_path)
        self.status.step = start_step

    def log_step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        with writing(self.log_path), open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"{step},{epoch},{loss:.6f},{lr:.6g}\n")
        self.status.step = step

    def adapter_path(self, step: int, epoch: int, final: bool) -> str:
        if final:
            stem = self.name
        elif self.args.save_every_n_steps and step % self.args.save_every_n_steps == 0:
            stem = f"{self.args.output_name or 'at'}-step{step:08d}"
        else:
            stem = f"{self.args.output_name or 'epoch'}-{epoch:06d}"
        return os.path.join(self.args.output_dir, stem + self.ext)

    def save_adapter(self, network, metadata: dict, step: int, epoch: int, final: bool, models) -> None:
        if not self.main:
            return
        path = self.adapter_path(step, epoch, final)
        with writing(path):
            network.save_weights(path, SAVE_DTYPES.get(self.args.save_precision), metadata)
            renamed = standardize_module_names(path) if path.endswith(".safetensors") else 0
        self.written.append(path)
        logger.info("saved %s%s", path, f" ({renamed} text-encoder modules given sd-scripts' names, "
                    "lora_te_text_model_..., that the WebUIs read)" if renamed else "")
        fp8 = self.args.fp8_base or self.args.fp8_base_unet  # W0 in memory is fp8-rounded: not the base users have
        if fp8 and final and path.endswith(".safetensors") and not self.args.no_export_lora:
            parts = "".join(f" --{name} {getattr(self.args, name)}" for name in ("ae", "clip_l", "t5xxl")
                            if getattr(self.args, name, None))
            logger.info("--fp8_base: no LoRA export at save (PaRa's LoRA form needs the full-precision base); write "
                        "it with: para-trainer export %s --model %s%s", path, self.args.pretrained_model_name_or_path,
                        parts)
        if path.endswith(".safetensors") and not self.args.no_export_lora and self.args.network_module == "networks.para" \
                and not fp8:
            from ..files.export import export_lora

            lora_path = lora_export_path(path)
            with writing(lora_path):
                report = export_lora(path, models, lora_path, SAVE_DTYPES.get(self.args.save_precision, torch.float16))
            self.written.append(lora_path)
            logger.info("saved %s (exact LoRA/LoCon export, relative error %.1e)", lora_path,
                        report["max_relative_error"])
        if not final:
            self._remove_old(step, epoch)

    def _remove_old(self, step: int, epoch: int) -> None:
        args = self.args
        old = []
        if args.save_every_n_steps and args.save_last_n_steps:
            # keep the saves of the last N steps
            stale_step = step - args.save_last_n_steps - args.save_every_n_steps
            if stale_step > 0:
                old.append(os.path.join(args.output_dir, f"{args.output_name or 'at'}-step{stale_step:08d}{self.ext}"))
        if args.save_every_n_epochs and args.save_last_n_epochs:
            stale_epoch = epoch - args.save_every_n_epochs * args.save_last_n_epochs
            if stale_epoch > 0:
                old.append(os.path.join(args.output_dir, f"{args.output_name or 'epoch'}-{stale_epoch:06d}{self.ext}"))
        for path in old + [lora_export_path(p) for p in old]:
            if os.path.exists(path):
                os.remove(path)
                logger.info("removed %s (--save_last_n_*)", path)

    def state_path(self, step: int, epoch: int, final: bool) -> str:
        if final:
            return os.path.join(self.args.output_dir, f"{self.name}-state")
        if self.args.save_every_n_steps and step % self.args.save_every_n_steps == 0:
            return os.path.join(self.args.output_dir, f"{self.name}-step{step:08d}-state")
        return os.path.join(self.args.output_dir, f"{self.name}-{epoch:06d}-state")

    def save_state(self, network, optimizer, lr_scheduler, step, epoch, seed, final) -> None:
        if not self.main:
            return
        path = self.state_path(step, epoch, final)
        with writing(path):
            save_train_state(path, network, optimizer, lr_scheduler, step, epoch, seed)
        self.status.last_state = path
        logger.info("saved state %s", path)

    def finish(self) -> None:
        samples = os.path.join(self.args.output_dir, "sample")
        print("\npara-trainer: done. Written:")
        for path in self.written:
            print(f"  adapter  {path}")
        if os.path.isdir(samples):
            print(f"  samples  {samples}")
        print(f"  log      {self.log_path}")


def draw_samples(network, models, prompts, args, tag: str, base: bool = False) -> list:
    """The sample prompts' images with the adapter applied, or with base=True the base model's: the samples "at
    first" of a new adapter show the base, since a PaRa adapter is not a no-op at initialization (it removes r
    random directions); those of an adapter loaded with --network_weights show it as loaded."""
    from ..models.sampling import sample_images

    multiplier = network.multiplier
    network.eval()
    if base:
        network.set_multiplier(0.0)
    try:
        return sample_images(models.pipeline, prompts, args.output_dir, args.output_name, tag, args.sample_sampler,
                             (512, 512), device=models.unet.device, clip_skip=args.clip_skip,
                             prediction_type="v_prediction" if models.v_parameterization else None)
    finally:
        network.set_multiplier(multiplier)
        network.train()


def judge_report(args, models, dataset, prompts, before: list, after: list) -> None:
    """On toy-sd1, with samples drawn before and after training: the judge's identity scores and a contact sheet
    of every sampled step beside the training images, sample/contact_sheet.png (toyworld/report.py)."""
    from pathlib import Path

    from ..models.sampling import SHEET_NAME, save_png
    from ..toyworld.report import format_scores, identifier_of, identity_scores, is_toy_model, sample_sheet

    if not (before and len(before) == len(after) and is_toy_model(models.unet)):
        return
    subjects = [e for d in dataset.datasets for e in d.entries if not e.subset.is_reg]
    identifier = next((identifier_of(e.subset.class_tokens or "") for e in subjects
                       if identifier_of(e.subset.class_tokens or "")), None)
    if identifier:
        scores = identity_scores(before, after, [p.prompt for p in prompts], [e.path for e in subjects], identifier)
        print(format_scores(scores, identifier))
    sheet = Path(args.output_dir) / "sample" / SHEET_NAME
    photos = list(dict.fromkeys(e.path for e in subjects))[:max(len(prompts), 5)]
    save_png(sample_sheet(sheet.parent, args.output_name, [p.prompt for p in prompts], photos), sheet)
    print(f"  contact sheet: {sheet}")


def remove_stale_temporaries(folder: str) -> None:
    """The temporary files and state folders (.tmp-*) that a killed run (SIGKILL, power loss) left behind: every
    file is written under such a name and renamed when complete, so they are never a finished file."""
    for name in os.listdir(folder):
        if name.startswith(".tmp-") or name.endswith("_train_log.csv.tmp"):
            path = os.path.join(folder, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            logger.info("removed %s, left by an interrupted run", path)


def save_train_state(path: str, network, optimizer, lr_scheduler, step: int, epoch: int, seed: int) -> None:
    """Network tensors, optimizer, schedule and position, in a folder written under a temporary name."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=".tmp-state-", dir=parent)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
                  os.path.join(temp, "network.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(temp, "optimizer.pt"))
        torch.save(lr_scheduler.state_dict(), os.path.join(temp, "scheduler.pt"))
        with open(os.path.join(temp, "train_state.json"), "w", encoding="utf-8") as f:
            json.dump({"current_step": step, "current_epoch": epoch, "seed": seed}, f)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def load_train_state(path: str, network, optimizer, lr_scheduler) -> int:
    from safetensors.torch import load_file

    with open(os.path.join(path, "train_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    saved = load_file(os.path.join(path, "network.safetensors"))
    current = network.state_dict()
    for key, tensor in saved.items():
        if key in current and tuple(current[key].shape) != tuple(tensor.shape):
            raise TrainError(f"--resume {path}: the saved network has other shapes than this one ({key}: saved "
                             f"{tuple(tensor.shape)}, here {tuple(current[key].shape)}); resume with the same "
                             "--network_dim and --network_args as the run that saved it")
    missing, unexpected = network.load_state_dict(saved, strict=False)
    if missing or unexpected:
        raise TrainError(f"--resume {path}: the saved network does not match this one "
                         f"({len(missing)} missing, {len(unexpected)} unexpected tensors); use the same network args")
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    lr_scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    return int(state["current_step"])
