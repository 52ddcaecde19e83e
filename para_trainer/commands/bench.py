"""`para-trainer bench`: PaRa side by side with peft's LoRA and PaRa (DEFT), LyCORIS, sd-scripts' LoRA and KronA.

Everything runs in one process on one UNet with random weights (or `--model`), the same target layers and the
same batch. Per method and rank it measures the steady-state time of a training step (forward, backward,
optimizer step; warm-up excluded; median over `--rounds` x `--steps`, the methods interleaved round by round
so that drift on a busy machine hits all of them alike), the peak memory above the frozen model, the trainable
parameters and the size of the file each method saves in its own format. The floor is the frozen UNet with
the backward pass taken to its input (every method also takes it there, so the graphs differ only by the
adapter). On CUDA the UNet runs in bf16 under autocast with float32 adapter parameters.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from networks.adapter_base import PRESETS, AdapterModule, AdapterNetwork, select_target_layers


class BenchError(ValueError):
    """A bench option that cannot be used."""


# Every method adapts exactly these Linear layers of every transformer block: q/k/v/out of self- and
# cross-attention and the two feed-forward layers. peft's DEFT only wraps Linear layers, so SD1's 1x1-conv
# proj_in/proj_out stay out for everybody.
TARGET_PATH = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
TARGET_KEY_REGEX = r"_transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_(0_proj|2))$"  # sd-scripts names
TARGET_DESCRIPTION = "attn1/attn2 to_q, to_k, to_v, to_out.0 and ff.net.0.proj, ff.net.2 of every transformer block"
FLUX_TARGET_DESCRIPTION = ("every Linear of the double and single blocks (diffusers' split layers; PaRa stacks "
                           "q/k/v and linear1's parts as the BFL layout fuses them, so it counts fewer modules)")

METHODS = ("floor", "para", "peft-lora", "peft-para", "locon", "lokr", "sd-lora", "krona")
METHOD_LABELS = {
    "floor": "frozen base (floor)",
    "para": "PaRa (networks.para, ours)",
    "peft-lora": "peft LoRA",
    "peft-para": "peft PaRa (DEFT para=True, qr)",
    "locon": "LyCORIS LoCon",
    "lokr": "LyCORIS LoKr",
    "sd-lora": "sd-scripts-style LoRA",
    "krona": "KronA (networks.krona, 64x8)",
}
RANKLESS = {"floor", "krona"}  # measured once, not per rank

# The default UNet: SD1's block types, head count and context width with the real 320/640/1280 channels, one
# layer per block and no transformer-less fourth 1280 level, so a CPU step takes about a second at 16x16 latents.
BENCH_UNET = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
}
UNET_CHOICES = ("bench", "sd1", "sd2", "sdxl", "tiny", "flux")
# --unet flux: diffusers' FluxTransformer2DModel with FLUX.1's block types (double- and single-stream, fused
# q/k/v and linear1 in the BFL layout that PaRa's files use) at a CPU-sized width: 8 heads of 64 (FLUX.1: 24 of 128)
BENCH_FLUX = {"in_channels": 64, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 64,
              "num_attention_heads": 8, "joint_attention_dim": 512, "pooled_projection_dim": 256,
              "guidance_embeds": True, "axes_dims_rope": (8, 28, 28)}
FLUX_TARGET_PATH = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.")
FLUX_METHODS = ("floor", "para", "peft-lora", "peft-para", "locon", "lokr")  # sd-lora and krona: SD UNets only
QUIET_LOGGERS = ("networks.para", "networks.krona", "peft")


@dataclass
class Result:
    method: str
    rank: int | None
    layers: int = 0
    trainable_params: int = 0
    file_bytes: int | None = None
    step_seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    floor_ratios: list[float] = field(default_factory=list)  # per round: median step / the floor steps around it
    peak_memory_bytes: int | None = None
    gflop: float | None = None  # matmul/conv work of one step (torch's FlopCounterMode): noise-free
    note: str = ""

    @property
    def step(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    @property
    def vs_floor(self) -> float | None:
        return statistics.median(self.floor_ratios) if self.floor_ratios else None


@dataclass
class Attached:
    """One method's adapter on the UNet: what a training step needs, how it saves, how it comes off."""

    params: list[torch.nn.Parameter]
    layers: int
    save: Callable[[str], str]  # folder -> path of the file the method writes
    detach: Callable[[], None]
    before_step: Callable[[], None] = lambda: None


# --------------------------------------------------------------------------------------------------
# The UNet and the batch


def build_unet(options, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    from ..models.tiny import read_tiny_config, real_unet_config

    if options.unet == "flux" and not options.model:
        from diffusers import FluxTransformer2DModel

        from ..models.flux.tiny import read_config

        config = {k: v for k, v in read_config("transformer").items() if not k.startswith("_")} \
            if getattr(options, "smoke", False) else BENCH_FLUX  # smoke: builtin:tiny-flux's widths
        torch.manual_seed(0)
        with torch.device(device):
            unet = FluxTransformer2DModel(**config)
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        description = (f"flux: FluxTransformer2DModel with random weights, {config['num_layers']} double + "
                       f"{config['num_single_layers']} single blocks, {config['num_attention_heads']} heads x "
                       f"{config['attention_head_dim']} (hidden {hidden}), T5 width {config['joint_attention_dim']}; "
                       "every Linear of the blocks adapted (lora_flux's default)")
    elif options.model:
        from ..files.export import load_base_model

        unet = load_base_model(options.model).unet
        description = f"{options.model} (its UNet)"
    else:
        if options.unet == "tiny":
            config = read_tiny_config("sd1", "unet")
            config = {k: v for k, v in config.items() if not k.startswith("_")}
        elif options.unet == "bench":
            config = {**real_unet_config("sd1"), **BENCH_UNET}
        else:
            config = real_unet_config(options.unet)
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
        widths = "/".join(str(c) for c in config["block_out_channels"])
        description = (f"{options.unet}: UNet2DConditionModel with random weights, channels {widths}, "
                       f"{config.get('layers_per_block', 2)} layer(s) per block, context "
                       f"{config.get('cross_attention_dim')}")
    unet.requires_grad_(False)
    unet.train()  # dropout is 0 in SD UNets; train() as a trainer has it
    return torch.nn.Module.to(unet, device=device, dtype=dtype), description


def make_batch(unet, batch_size: int, latent_size: int, device: torch.device) -> dict:
    config = unet.config
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    if is_flux(unet):  # packed 2x2 latent patches and 64 T5 tokens
        side = latent_size // 2
        ids = torch.zeros(side, side, 3)
        ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
        return {"hidden_states": randn(batch_size, side * side, config.in_channels).requires_grad_(True),
                "encoder_hidden_states": randn(batch_size, 64, config.joint_attention_dim),
                "pooled_projections": randn(batch_size, config.pooled_projection_dim),
                "timestep": torch.rand(batch_size, generator=generator).to(device),
                "guidance": torch.full((batch_size,), 3.5, device=device),
                "img_ids": ids.reshape(-1, 3).to(device), "txt_ids": torch.zeros(64, 3, device=device),
                "target": randn(batch_size, side * side, config.in_channels)}

    batch = {
        "sample": randn(batch_size, config.in_channels, latent_size, latent_size).requires_grad_(True),
        "timestep": torch.randint(0, 1000, (batch_size,), generator=generator).to(device),
        "encoder_hidden_states": randn(batch_size, 77, config.cross_attention_dim),
        "target": randn(batch_size, config.out_channels, latent_size, latent_size),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        batch["added_cond_kwargs"] = {"text_embeds": randn(batch_size, pooled), "time_ids": randn(batch_size, 6)}
    return batch


def is_flux(unet) -> bool:
    return hasattr(unet, "single_transformer_blocks")


def target_layers(unet) -> dict[str, torch.nn.Linear]:
    path = FLUX_TARGET_PATH if is_flux(unet) else TARGET_PATH
    layers = {name: m for name, m in unet.named_modules() if path.search(name) and isinstance(m, torch.nn.Linear)}
    if not layers:
        raise BenchError("the UNet has no transformer-block attention/feed-forward Linear layers to adapt; "
                         "use a Stable Diffusion UNet (--unet or --model)")
    return layers


# --------------------------------------------------------------------------------------------------
# The methods


def _network_attachment(network, unet, device) -> Attached:
    network.apply_to(None, unet, False, True)
    network.to(device)
    network.train()

    def save(folder):
        path = os.path.join(folder, "adapter.safetensors")
        network.save_weights(path, None, {})
        return path

    return Attached(list(network.parameters()), len(network.adapter_modules), save, network.restore,
                    lambda: network.on_step_start(None, unet))


def attach_para(unet, rank, device):
    from networks import para

    network = para.create_network(1.0, rank, None, None, None, unet,
                                  **({} if is_flux(unet) else {"include": TARGET_KEY_REGEX}))
    return _network_attachment(network, unet, device)


def attach_krona(unet, rank, device):
    from networks import krona  # noqa: F401  (an ImportError says why KronA is skipped)

    network = krona.create_network(1.0, None, None, None, None, unet, preset="full", include=TARGET_KEY_REGEX)
    return _network_attachment(network, unet, device)


def attach_sd_lora(unet, rank, device):
    modules = [SdScriptsLoRAModule(t.lora_name, t.layer, rank) for t in
               select_target_layers(None, unet, PRESETS["full"], False, TARGET_KEY_REGEX)]
    network = AdapterNetwork(modules)
    network.network_module = "networks.lora"
    return _network_attachment(network, unet, device)


def _peft_attachment(unet, config, device) -> Attached:
    from peft import get_peft_model

    model = get_peft_model(unet, config)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def save(folder):
        model.save_pretrained(folder)
        return os.path.join(folder, "adapter_model.safetensors")

    layers = sum(1 for m in unet.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear))
    return Attached(params, layers, save, lambda: model.unload())


def attach_peft_lora(unet, rank, device):
    from peft import LoraConfig

    return _peft_attachment(unet, LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(target_layers(unet))),
                            device)


def attach_peft_para(unet, rank, device):
    try:
        from peft import DeftConfig
    except ImportError:
        raise ImportError("this peft has no DeftConfig (peft's PaRa arrived in peft 0.21)") from None
    return _peft_attachment(unet, DeftConfig(r=rank, para=True, decomposition_method="qr",
                                             target_modules=sorted(target_layers(unet))), device)


def _lycoris_attachment(unet, rank, device, algo) -> Attached:
    from lycoris.wrapper import LycorisNetwork

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # it logs to stdout, which --json needs clean

    names = [re.escape(name) + "$" for name in target_layers(unet)]
    LycorisNetwork.apply_preset({"enable_conv": False, "target_module": [], "target_name": names,
                                 "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False,
                                 "exclude_name": []})
    network = LycorisNetwork(unet, multiplier=1.0, lora_dim=rank, alpha=1, network_module=algo,
                             warn_on_unmatched=False)
    network.apply_to()
    network.to(device)
    network.train()

    def save(folder):
        path = os.path.join(folder, f"{algo}.safetensors")
        network.save_weights(path, None, {})
        return path

    return Attached([p for p in network.parameters() if p.requires_grad], len(network.loras), save, network.restore)


ATTACH = {
    "para": attach_para,
    "peft-lora": attach_peft_lora,
    "peft-para": attach_peft_para,
    "locon": lambda unet, rank, device: _lycoris_attachment(unet, rank, device, "locon"),
    "lokr": lambda unet, rank, device: _lycoris_attachment(unet, rank, device, "lokr"),
    "sd-lora": attach_sd_lora,
    "krona": attach_krona,
}


class SdScriptsLoRAModule(AdapterModule):
    """sd-scripts' networks/lora.py LoRAModule on a Linear: out + up(down(x))·m·alpha/r, kaiming/zero init."""

    def __init__(self, lora_name, layer, rank, alpha=1.0):
        super().__init__(lora_name, layer)
        self.lora_down = torch.nn.Linear(self.in_features, rank, bias=False)
        self.lora_up = torch.nn.Linear(rank, self.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=5 ** 0.5)
        torch.nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def adapt_output(self, x, out):
        return out + self.lora_up(self.lora_down(x)) * (self.multiplier * self.scale)

    def file_tensors(self):
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight, "alpha": self.alpha}


# --------------------------------------------------------------------------------------------------
# Measuring


class PeakMemory:
    """Peak memory of one step above the level before it: CUDA's allocator stats, or sampled RSS on CPU.

    On CPU the process must have called `use_returning_malloc` before it allocated the model: glibc then hands
    freed blocks above 64 KiB back to the system (and each measurement trims its free lists), so RSS follows
    the live tensors and repeated measurements of one method agree within about 1%. That mode slows steps
    down by ~30% (page faults), so timing runs in another process.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.start = 0
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    @property
    def supported(self) -> bool:
        return self.device.type == "cuda" or os.path.exists("/proc/self/statm")

    @staticmethod
    def _libc():
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return None
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None

    @classmethod
    def use_returning_malloc(cls) -> bool:
        """glibc's M_MMAP_THRESHOLD at 64 KiB for the rest of this process; False where that is not glibc."""
        libc = cls._libc()
        return bool(libc and libc.mallopt(-3, 64 * 1024))

    @classmethod
    def use_keeping_malloc(cls) -> bool:
        """glibc keeps freed memory for reuse (what CUDA's caching allocator does) for the rest of this process.

        By default it gave large blocks back and every step paid ~150,000 page faults on this benchmark's UNet
        (a quarter of the floor's step on a 2-core VM, and its largest source of noise), for every method alike.
        """
        libc = cls._libc()
        # M_MMAP_THRESHOLD (-3) at glibc's maximum (32 MiB), M_TRIM_THRESHOLD (-1) and M_TOP_PAD (-2) large.
        return bool(libc and libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 1 << 30) and libc.mallopt(-2, 256 << 20))

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        libc = self._libc()
        if libc:
            libc.malloc_trim(0)
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer) -> int:
    return sum(tensor_bytes(v for v in state.values() if isinstance(v, torch.Tensor))
               for state in optimizer.state.values()) if optimizer else 0


@dataclass
class Setup:
    """The UNet, the batch and the precision every method runs with."""

    device: torch.device
    precision: str
    autocast_dtype: torch.dtype | None
    unet: torch.nn.Module | None
    unet_description: str
    widths: list[tuple[int, int]]  # (d_in, d_out) of every targeted layer
    batch: dict | None
    flux: bool = False


def make_setup(options) -> Setup:
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available; use --device cpu")
    precision = options.precision or ("bf16" if device.type == "cuda" else "fp32")
    weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    unet, description = build_unet(options, device, weight_dtype)
    if is_flux(unet):
        other = [m for m in options.methods if m not in FLUX_METHODS]
        if other and options.methods != list(METHODS):
            raise BenchError(f"--methods {other[0]}: on FLUX the bench runs {', '.join(FLUX_METHODS)} "
                             "(sd-lora and krona target SD UNets only)")
        options.methods = [m for m in options.methods if m in FLUX_METHODS]
    widths = [(m.in_features, m.out_features) for m in target_layers(unet).values()]
    narrowest = min(d_out for _, d_out in widths)
    if any(m in options.methods for m in ("para", "peft-para")) and not all(0 < r < narrowest for r in options.ranks):
        raise BenchError(f"--ranks {max(options.ranks)}: PaRa needs 0 < r < {narrowest}, the outputs of the "
                         "narrowest targeted layer")
    batch = make_batch(unet, options.batch_size, options.latent_size, device)
    return Setup(device, precision, None if precision == "fp32" else weight_dtype, unet, description, widths, batch,
                 is_flux(unet))


def fused_adamw(device: torch.device) -> bool:
    """torch's fused AdamW runs on these devices."""
    return device.type in ("cpu", "cuda")


class Session:
    """One method at one rank on the setup's UNet, with its AdamW; the adapter comes off on exit."""

    def __init__(self, setup: Setup, method: str, rank: int | None):
        self.setup, self.method, self.rank = setup, method, rank

    def __enter__(self):
        self.attached = (ATTACH[self.method](self.setup.unet, self.rank, self.setup.device)
                         if self.method != "floor" else None)
        params = self.attached.params if self.attached else []
        # fused: one kernel for all parameters, as users get with --optimizer_args fused=True; the per-parameter
        # default cost 10-15 ms a step on a 2-core CPU at PaRa r = 32 (70 tensors), a cost of the loop, not the adapter
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused_adamw(self.setup.device)) if params else None
        return self

    def step(self) -> None:
        setup = self.setup
        if self.attached:
            self.attached.before_step()
        inputs = {k: v for k, v in setup.batch.items() if k != "target"}
        with torch.autocast(setup.device.type, dtype=setup.autocast_dtype or torch.float32,
                            enabled=setup.autocast_dtype is not None):
            prediction = setup.unet(**inputs).sample
        # Backward also to the input latents, for every method: the floor's graph plus the adapter.
        F.mse_loss(prediction.float(), setup.batch["target"].float()).backward()
        if self.optimizer:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        setup.batch["hidden_states" if "hidden_states" in setup.batch else "sample"].grad = None

    def sync(self) -> None:
        if self.setup.device.type == "cuda":
            torch.cuda.synchronize()

    def __exit__(self, *exc):
        if self.attached:
            self.attached.detach()
        self.attached = self.optimizer = None
        gc.collect()


def time_steps(setup: Setup, config, warmup: int, steps: int, result: Result) -> list[float]:
    """Attach, warm up, time `steps` training steps (wall clock and this process's CPU time), detach."""
    seconds = []
    with Session(setup, *config) as session:
        for _ in range(warmup):
            session.step()
        for _ in range(steps):
            session.sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            session.step()
            session.sync()
            seconds.append(time.perf_counter() - start)
            result.cpu_seconds.append(time.process_time() - cpu_start)
    result.step_seconds += seconds
    return seconds


def time_rounds(setup: Setup, configs: list, options, results: dict, log) -> None:
    """Every round times each config once, with one floor step before and after it (shared by neighbours).

    A shared machine changes speed by 20% within minutes; a ratio to the floor steps taken seconds before and
    after a method cancels that drift, where medians of raw times do not.
    """
    floor = results.get(("floor", None)) or Result("floor", None)
    timed = [c for c in configs if c != ("floor", None)]

    def floor_step() -> float:
        return time_steps(setup, ("floor", None), 0, 1, floor)[0]

    time_steps(setup, ("floor", None), 0, 1, Result("floor", None))  # warm-up
    for round_index in range(options.rounds):
        before = floor_step()
        for config in timed if round_index % 2 == 0 else timed[::-1]:  # alternate: nobody always goes first
            if results[config].note:
                continue
            if log:
                log(f"timing, round {round_index + 1}/{options.rounds}: {_describe(config)}")
            try:
                seconds = time_steps(setup, config, options.warmup, options.steps, results[config])
            except ImportError as error:
                results[config].note = f"skipped: {error}"
                continue
            after = floor_step()
            results[config].floor_ratios.append(statistics.median(seconds) / ((before + after) / 2))
            before = after
        floor.floor_ratios.append(1.0)


def count_and_save(setup: Setup, config, result: Result, files_dir: str) -> None:
    """Attach, one step, then a measured step (peak memory), the parameter count and the saved file."""
    with Session(setup, *config) as session:
        attached = session.attached
        result.layers = attached.layers if attached else len(setup.widths)
        result.trainable_params = sum(p.numel() for p in attached.params) if attached else 0
        session.step()  # gradients and optimizer state exist from here on, as in training
        with FlopCounterMode(display=False) as flops:
            session.step()
        result.gflop = flops.get_total_flops() / 1e9
        memory = PeakMemory(setup.device)
        if memory.supported:
            with memory:
                session.step()
            persistent = tensor_bytes(attached.params) + optimizer_state_bytes(session.optimizer) if attached else 0
            result.peak_memory_bytes = memory.delta + persistent
        if attached:
            folder = os.path.join(files_dir, f"{config[0]}-r{config[1]}")
            os.makedirs(folder, exist_ok=True)
            result.file_bytes = os.path.getsize(attached.save(folder))


def _describe(config) -> str:
    return config[0] + (f" r={config[1]}" if config[1] else "")


def _inspect_worker(option_values: dict, configs: list, files_dir: str, verbose: bool, connection) -> None:
    """In a fresh process: peak memory, parameter count and saved file of each config (see `inspect_configs`)."""
    try:
        returning_malloc = PeakMemory.use_returning_malloc()  # before the UNet exists, so RSS follows the tensors
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        setup = make_setup(argparse.Namespace(**option_values))
        found = {}
        for config in configs:
            if verbose:
                print(f"memory, parameters, file: {_describe(config)}", file=sys.stderr, flush=True)
            result = Result(*config)
            count_and_save(setup, config, result, files_dir)
            found[config] = (result.layers, result.trainable_params, result.file_bytes, result.peak_memory_bytes,
                             result.gflop)
        connection.send(("ok", found, returning_malloc))
    except BaseException as error:  # the parent reports it; a child's traceback alone would get lost
        connection.send(("error", f"{type(error).__name__}: {error}", False))
    finally:
        connection.close()


def inspect_configs(options, configs: list, results: dict, files_dir: str, verbose: bool) -> bool:
    """Memory, parameters and files, measured in one fresh child process with the same UNet and batch.

    RSS is a clean measure only in a process whose malloc returned freed blocks from its start; switching that
    on in the timing process afterwards gave deltas that depended on what had run before. Returns whether
    glibc's returning mode was on.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_inspect_worker, args=(vars(options), configs, files_dir, verbose, sender))
    child.start()
    sender.close()
    try:
        status, payload, returning_malloc = receiver.recv()
    except EOFError:
        child.join()
        raise BenchError(f"the memory/file measuring process died (exit code {child.exitcode}); "
                         "try fewer --ranks or a smaller --latent-size") from None
    child.join()
    if status != "ok":
        raise BenchError(f"measuring memory and files failed: {payload}")
    for config, values in payload.items():
        result = results[config]
        result.layers, result.trainable_params, result.file_bytes, result.peak_memory_bytes, result.gflop = values
    return returning_malloc


def run_bench(options, log=None) -> dict:
    """Run the benchmark described by the parsed options; returns the report (conditions, results, checks).

    `log(message)` gets progress lines (None: silent).
    """
    keeping_malloc = torch.device(options.device).type == "cpu" and PeakMemory.use_keeping_malloc()
    setup = make_setup(options)
    configs = [(m, r) for m in options.methods for r in ([None] if m in RANKLESS else options.ranks)]
    results = {config: Result(*config) for config in configs}
    load = [round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None]
    time_rounds(setup, configs, options, results, log)
    profiles = profile_methods(options, setup, log) if options.profile else []
    load.append(round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
    setup.unet = setup.batch = None  # the child builds its own: two big UNets need not coexist
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="para-bench-") as temp:
        returning_malloc = inspect_configs(options, [c for c in configs if not results[c].note], results,
                                           options.keep_files or temp, log is not None)
    conditions_ = conditions(options, setup)
    conditions_["load_average"] = load
    if keeping_malloc:
        conditions_["timing_malloc"] = "glibc keeps freed memory (no page faults per step)"
    conditions_["memory"] = ("torch.cuda.max_memory_allocated" if setup.device.type == "cuda" else
                             "sampled RSS" + (", glibc returning freed blocks" if returning_malloc else "")
                             ) + ", measured in a second process with the same UNet and batch"
    return {"conditions": conditions_, "results": [result_dict(results[c], results) for c in configs],
            "checks": target_checks(results, setup.widths), "profiles": profiles}


# --------------------------------------------------------------------------------------------------
# Profiling: where the time goes, as self time per step above the floor


def op_times(setup: Setup, config, steps: int) -> dict[str, float]:
    """Self time per op and step (ms) under torch.profiler, after two untimed steps."""
    from torch.profiler import ProfilerActivity, profile

    with Session(setup, *config) as session:
        for _ in range(2):
            session.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                session.step()
            session.sync()
    key = "self_device_time_total" if setup.device.type == "cuda" else "self_cpu_time_total"
    return {event.key: getattr(event, key) / 1e3 / steps for event in prof.key_averages()}


def profile_methods(options, setup: Setup, log) -> list[dict]:
    floor = op_times(setup, ("floor", None), options.profile_steps)
    profiles = []
    for method in options.profile:
        for rank in [None] if method in RANKLESS else options.ranks:
            if log:
                log(f"profiling {_describe((method, rank))}")
            measured = op_times(setup, (method, rank), options.profile_steps)
            extra = {op: measured.get(op, 0.0) - floor.get(op, 0.0) for op in set(measured) | set(floor)}
            top = sorted(extra.items(), key=lambda item: -abs(item[1]))[:options.profile_top]
            profiles.append({"method": method, "rank": rank, "total_ms": sum(measured.values()),
                             "floor_total_ms": sum(floor.values()),
                             "top_ops_extra_ms": [{"op": op, "ms": round(ms, 3)} for op, ms in top]})
    return profiles


# --------------------------------------------------------------------------------------------------
# The report


def _cpu_median(result: Result | None) -> float | None:
    return statistics.median(result.cpu_seconds) if result and result.cpu_seconds else None


def result_dict(result: Result, results: dict) -> dict:
    lora = results.get(("peft-lora", result.rank))
    floor_cpu, cpu = _cpu_median(results.get(("floor", None))), _cpu_median(result)
    data = asdict(result)
    data.update(step_median_s=result.step, step_min_s=min(result.step_seconds) if result.step_seconds else None,
                cpu_median_s=cpu,
                # CPU time (all threads) counts the work, not the waits: steadier than wall time on a shared VM
                cpu_vs_floor=round(cpu / floor_cpu, 3) if cpu and floor_cpu else None,
                step_vs_peft_lora=(round(result.vs_floor / lora.vs_floor, 3)
                                   if result.rank and result.vs_floor and lora and lora.vs_floor else None),
                step_vs_floor=round(result.vs_floor, 3) if result.vs_floor else None,
                memory_vs_peft_lora=(round(result.peak_memory_bytes / lora.peak_memory_bytes, 3)
                                     if lora and lora.peak_memory_bytes and result.peak_memory_bytes is not None
                                     and result.rank else None),
                file_vs_peft_lora=(round(result.file_bytes / lora.file_bytes, 4)
                                   if lora and lora.file_bytes and result.file_bytes and result.rank else None))
    return data


def conditions(options, setup: Setup) -> dict:
    from importlib import metadata

    versions = {}
    for package in ("torch", "diffusers", "peft", "lycoris-lora"):  # distribution names: lycoris has no __version__
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    if setup.device.type == "cuda":
        machine = torch.cuda.get_device_name(setup.device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    return {"date": date.today().isoformat(), "device": setup.device.type, "machine": machine,
            "precision": setup.precision, "unet": setup.unet_description, "latent_size": options.latent_size,
            "batch_size": options.batch_size, "ranks": options.ranks, "warmup": options.warmup,
            "steps": options.steps, "rounds": options.rounds,
            "targets": f"{len(setup.widths)} layers: "
                       f"{FLUX_TARGET_DESCRIPTION if setup.flux else TARGET_DESCRIPTION}",
            "sum_d_out": sum(o for _, o in setup.widths), "sum_d_in": sum(i for i, _ in setup.widths),
            "optimizer": f"torch.optim.AdamW(lr=1e-4, fused={fused_adamw(setup.device)})", "versions": versions}


def target_checks(results: dict, widths: list[tuple[int, int]]) -> list[dict]:
    """The issue's targets for our PaRa, where this run measured what they need."""
    shape_ratio = sum(o for _, o in widths) / sum(i + o for i, o in widths)
    checks = []

    def add(name, value, limit, ok):
        checks.append({"target": name, "value": round(value, 4), "limit": round(limit, 4), "met": bool(ok)})

    for (method, rank), para in results.items():
        if method != "para" or not para.vs_floor:
            continue
        lora, deft = results.get(("peft-lora", rank)), results.get(("peft-para", rank))
        if lora and lora.vs_floor:
            for at, limit in ((32, 0.9), (128, 0.75)):
                if rank == at:
                    value = para.vs_floor / lora.vs_floor
                    add(f"step time / peft LoRA at r={rank}", value, limit, value <= limit)
            if para.peak_memory_bytes is not None and lora.peak_memory_bytes:
                add(f"peak memory / peft LoRA at r={rank}", para.peak_memory_bytes / lora.peak_memory_bytes, 1.0,
                    para.peak_memory_bytes <= lora.peak_memory_bytes)
            if para.file_bytes and lora.file_bytes:
                value = para.file_bytes / lora.file_bytes
                add(f"file size / peft LoRA at r={rank} (shape ratio {shape_ratio:.4f} +-1%)", value,
                    shape_ratio * 1.01, abs(value / shape_ratio - 1) <= 0.01)
        if deft and deft.vs_floor:
            add(f"step time / peft PaRa at r={rank}", para.vs_floor / deft.vs_floor, 1.0, para.vs_floor <= deft.vs_floor)
        if rank == 32:
            add("overhead over the floor at r=32", para.vs_floor - 1, 0.15, para.vs_floor <= 1.15)
    return checks


def _size(count: int | None, unit: str = "B") -> str:
    if count is None:
        return "-"
    for scale, prefix in ((1 << 30, "Gi"), (1 << 20, "Mi"), (1 << 10, "Ki")):
        if count >= scale:
            return f"{count / scale:.1f} {prefix}{unit}"
    return f"{count} {unit}"


def format_report(report: dict) -> str:
    c = report["conditions"]
    lines = [f"para-trainer bench, {c['date']}: {c['machine']} ({c['device']}, {c['precision']}), "
             f"torch {c['versions']['torch']}",
             f"UNet: {c['unet']}; latents {c['batch_size']}x{c['latent_size']}x{c['latent_size']}",
             f"targets: {c['targets']} (sum d_out {c['sum_d_out']}, sum d_in {c['sum_d_in']})",
             f"step = forward, backward and {c['optimizer']} step; median (and min) of {c['rounds']} rounds x "
             f"{c['steps']} steps after {c['warmup']} warm-up step(s), methods interleaved; "
             f"load average {c['load_average'][0]} before, {c['load_average'][1]} after"
             + (f"; {c['timing_malloc']}" if c.get("timing_malloc") else ""),
             "x floor = median over rounds of a method's step / the floor steps just before and after it; "
             "x LoRA = x floor / peft LoRA's x floor; cpu x floor = median CPU time of a step (all threads: the "
             "work without the waits) / the floor's",
             f"memory = peak above the frozen model during a step ({c['memory']}), with the adapter's parameters "
             "and optimizer state; GFLOP = matmul/conv work of one step (FlopCounterMode; no QR/Cholesky solves)",
             ""]
    header = ("method", "rank", "layers", "params", "file", "step ms", "min ms", "x LoRA", "x floor", "cpu x floor",
              "GFLOP", "memory", "mem x LoRA")
    rows = []
    for r in report["results"]:
        if r["note"]:
            rows.append((METHOD_LABELS[r["method"]], str(r["rank"] or "-"), r["note"]))
            continue
        rows.append((METHOD_LABELS[r["method"]], str(r["rank"] or "-"), str(r["layers"]),
                     f"{r['trainable_params']:,}", _size(r["file_bytes"]),
                     f"{r['step_median_s'] * 1e3:.0f}" if r["step_median_s"] else "-",
                     f"{r['step_min_s'] * 1e3:.0f}" if r["step_min_s"] else "-",
                     f"{r['step_vs_peft_lora']:.2f}" if r["step_vs_peft_lora"] else "-",
                     f"{r['step_vs_floor']:.2f}" if r["step_vs_floor"] else "-",
                     f"{r['cpu_vs_floor']:.2f}" if r["cpu_vs_floor"] and c["device"] == "cpu" else "-",
                     f"{r['gflop']:.3g}" if r["gflop"] is not None else "-",
                     _size(r["peak_memory_bytes"]),
                     f"{r['memory_vs_peft_lora']:.2f}" if r["memory_vs_peft_lora"] else "-"))
    widths = [max(len(row[i]) for row in [header] + [r for r in rows if len(r) == len(header)])
              for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        if len(row) != len(header):
            lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2]]))
        else:
            lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    if report["checks"]:
        lines += ["", "targets (issue 8) for our PaRa:"]
        lines += [f"  {'met   ' if ch['met'] else 'MISSED'} {ch['target']}: {ch['value']:.3f} (limit {ch['limit']:.3f})"
                  for ch in report["checks"]]
    for p in report["profiles"]:
        lines += ["", f"profile {p['method']}" + (f" r={p['rank']}" if p["rank"] else "")
                  + f": {p['total_ms']:.0f} ms/step of op self time, floor {p['floor_total_ms']:.0f}; "
                  "largest differences to the floor (ms/step):"]
        lines += [f"  {item['ms']:+9.2f}  {item['op']}" for item in p["top_ops_extra_ms"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def _list(kind, choices=None):
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if kind is int:
            try:
                values = [int(item) for item in items]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
            if not values or any(v <= 0 for v in values):
                raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
            return values
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0] if unknown else 'empty list'}; choose from "
                                             + ", ".join(choices))
        return items
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", type=_list(str, METHODS), default=list(METHODS),
                        help="comma-separated, from " + ", ".join(METHODS) + " (default: all)")
    parser.add_argument("--ranks", type=_list(int), default=[4, 32, 128], help="comma-separated (default 4,32,128)")
    parser.add_argument("--unet", choices=UNET_CHOICES, default="bench",
                        help="random-weight UNet: bench (default: SD1 blocks at the real 320/640/1280 widths, one "
                             "layer per block), sd1, sd2, sdxl (full size, for GPUs), tiny (smoke tests)")
    parser.add_argument("--model", help="a real model instead (diffusers folder, .safetensors/.ckpt, builtin:tiny-sd1)")
    parser.add_argument("--latent-size", type=int, default=16, help="latent height and width (default 16 = 128 px)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method and round (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method and round (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, methods interleaved (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="UNet weights and autocast (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--profile", type=_list(str, METHODS[1:]), nargs="?", const=["para"], default=[],
                        help="also profile these methods (default para) against the floor with torch.profiler")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-top", type=int, default=12)
    parser.add_argument("--keep-files", metavar="DIR", help="keep every method's saved file in DIR")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="CI mode: tiny UNet (or --unet flux's), 8x8 latents, ranks 2,4, one round of 2 steps")


def run(options) -> int:
    """`para-trainer bench` (options from `add_arguments`); errors are printed as one line, exit status 2."""
    if options.smoke:
        options.latent_size, options.rounds, options.steps, options.warmup = 8, 1, 2, 0
        options.unet = "flux" if options.unet == "flux" else "tiny"
        if options.ranks == [4, 32, 128]:
            options.ranks = [2, 4]
    # The adapters' own creation logs (KronA, PaRa, peft: lines per attach) would drown the progress.
    quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        for name in ("latent_size", "batch_size", "steps", "rounds"):
            if getattr(options, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
        if options.warmup < 0:
            raise BenchError("--warmup must be 0 or more")
        report = run_bench(options, log=lambda message: print(message, file=sys.stderr, flush=True))
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    print(json.dumps(report, indent=1) if options.json else format_report(report))
    return 0


def add_subcommand(commands) -> None:
    """`para-trainer bench` on the cli's subparsers."""
    parser = commands.add_parser("bench", help="time, memory, parameters and file size of PaRa vs peft, LyCORIS, "
                                               "sd-scripts LoRA and KronA on one UNet")
    add_arguments(parser)
    parser.set_defaults(run=run)
