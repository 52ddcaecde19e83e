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

from networks.adapter_base import PRESETS, AdapterModule, AdapterNetwork, select_target_layers


class BenchError(ValueError):
    """A bench option that cannot be used."""


# Every method adapts exactly these Linear layers of every transformer block: q/k/v/out of self- and
# cross-attention and the two feed-forward layers. peft's DEFT only wraps Linear layers, so SD1's 1x1-conv
# proj_in/proj_out stay out for everybody.
TARGET_PATH = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
TARGET_KEY_REGEX = r"_transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_(0_proj|2))$"  # sd-scripts names
TARGET_DESCRIPTION = "attn1/attn2 to_q, to_k, to_v, to_out.0 and ff.net.0.proj, ff.net.2 of every transformer block"

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
UNET_CHOICES = ("bench", "sd1", "sd2", "sdxl", "tiny")
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
    peak_memory_bytes: int | None = None
    note: str = ""

    @property
    def step(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None


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

    from .tiny_models import read_tiny_config, real_unet_config

    if options.model:
        from .export import load_base_model

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


def target_layers(unet) -> dict[str, torch.nn.Linear]:
    layers = {name: m for name, m in unet.named_modules()
              if TARGET_PATH.search(name) and isinstance(m, torch.nn.Linear)}
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

    network = para.create_network(1.0, rank, None, None, None, unet, include=TARGET_KEY_REGEX)
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


def training_step(unet, batch, attached: Attached | None, optimizer, autocast_dtype) -> None:
    if attached:
        attached.before_step()
    inputs = {k: v for k, v in batch.items() if k != "target"}
    with torch.autocast(batch["sample"].device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        prediction = unet(**inputs).sample
    loss = F.mse_loss(prediction.float(), batch["target"].float())
    loss.backward()  # also to the input latents, for every method: the floor's graph plus the adapter
    if optimizer:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    batch["sample"].grad = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Session:
    """One method at one rank attached to the UNet, with its optimizer; detached on exit."""

    def __init__(self, unet, method, rank, device):
        self.unet, self.method, self.rank, self.device = unet, method, rank, device

    def __enter__(self):
        self.attached = ATTACH[self.method](self.unet, self.rank, self.device) if self.method != "floor" else None
        params = self.attached.params if self.attached else []
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        return self

    def step(self, autocast_dtype):
        training_step(self.unet, self.batch, self.attached, self.optimizer, autocast_dtype)

    def __exit__(self, *exc):
        if self.attached:
            self.attached.detach()
        self.attached = self.optimizer = None
        gc.collect()


def time_steps(unet, batch, method, rank, device, autocast_dtype, warmup, steps, result: Result) -> None:
    """Attach, warm up, time `steps` training steps (wall clock and this process's CPU time), detach."""
    with _Session(unet, method, rank, device) as session:
        session.batch = batch
        for _ in range(warmup):
            session.step(autocast_dtype)
        for _ in range(steps):
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            session.step(autocast_dtype)
            _sync(device)
            result.step_seconds.append(time.perf_counter() - start)
            result.cpu_seconds.append(time.process_time() - cpu_start)


def count_and_save(unet, batch, method, rank, device, autocast_dtype, result: Result, files_dir: str) -> None:
    """Attach, one step, then a measured step (peak memory), parameter count and the saved file."""
    with _Session(unet, method, rank, device) as session:
        session.batch = batch
        attached = session.attached
        result.layers = attached.layers if attached else len(target_layers(unet))
        result.trainable_params = sum(p.numel() for p in attached.params) if attached else 0
        session.step(autocast_dtype)  # gradients and optimizer state exist from here on, as in training
        memory = PeakMemory(device)
        if memory.supported:
            with memory:
                session.step(autocast_dtype)
            persistent = tensor_bytes(attached.params) + optimizer_state_bytes(session.optimizer) if attached else 0
            result.peak_memory_bytes = memory.delta + persistent
        if attached:
            folder = os.path.join(files_dir, f"{method}-r{rank}")
            os.makedirs(folder, exist_ok=True)
            result.file_bytes = os.path.getsize(attached.save(folder))


@dataclass
class _Setup:
    device: torch.device
    precision: str
    autocast_dtype: torch.dtype | None
    unet: torch.nn.Module
    unet_description: str
    layers: dict
    batch: dict


def _setup(options) -> _Setup:
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available; use --device cpu")
    precision = options.precision or ("bf16" if device.type == "cuda" else "fp32")
    weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    unet, description = build_unet(options, device, weight_dtype)
    layers = target_layers(unet)
    narrowest = min(m.out_features for m in layers.values())
    if any(m in options.methods for m in ("para", "peft-para")) and not all(0 < r < narrowest for r in options.ranks):
        raise BenchError(f"--ranks {max(options.ranks)}: PaRa needs 0 < r < {narrowest}, the outputs of the "
                         "narrowest targeted layer")
    batch = make_batch(unet, options.batch_size, options.latent_size, device)
    return _Setup(device, precision, None if precision == "fp32" else weight_dtype, unet, description, layers, batch)


def _describe(config) -> str:
    return config[0] + (f" r={config[1]}" if config[1] else "")


def _inspect_worker(option_values: dict, configs: list, files_dir: str, verbose: bool, connection) -> None:
    """In a fresh process: peak memory, parameter count and saved file of each config (see `inspect_configs`)."""
    try:
        returning_malloc = PeakMemory.use_returning_malloc()  # before the UNet exists, so RSS follows the tensors
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        setup = _setup(argparse.Namespace(**option_values))
        found = {}
        for config in configs:
            if verbose:
                print(f"memory, parameters, file: {_describe(config)}", file=sys.stderr, flush=True)
            result = Result(*config)
            count_and_save(setup.unet, setup.batch, *config, setup.device, setup.autocast_dtype, result, files_dir)
            found[config] = (result.layers, result.trainable_params, result.file_bytes, result.peak_memory_bytes)
        connection.send(("ok", found, returning_malloc))
    except BaseException as error:  # the parent reports it; a child traceback alone would be lost in the output
        connection.send(("error", f"{type(error).__name__}: {error}", False))
    finally:
        connection.close()


def inspect_configs(options, configs: list, results: dict, files_dir: str, verbose: bool) -> bool:
    """Memory, parameters and files in one fresh child process with the same UNet and batch.

    RSS is only a clean measure in a process whose malloc returned freed blocks from the start; switching that
    on in the timing process afterwards gave deltas that depended on what ran before. Returns whether glibc's
    returning mode was on.
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
    for config, (layers, params, file_bytes, memory) in payload.items():
        result = results[config]
        result.layers, result.trainable_params, result.file_bytes, result.peak_memory_bytes = (
            layers, params, file_bytes, memory)
    return returning_malloc


def run_bench(options, log=None) -> dict:
    """Run the benchmark described by the parsed options; returns the report (conditions, results, checks).

    `log(message)` gets progress lines (None: silent).
    """
    setup = _setup(options)
    configs = [(m, r) for m in options.methods for r in ([None] if m in RANKLESS else options.ranks)]
    results = {config: Result(*config) for config in configs}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for round_index in range(options.rounds):
        order = configs if round_index % 2 == 0 else configs[::-1]  # alternate so no method always goes first
        for config in order:
            if results[config].note:
                continue
            if log:
                log(f"timing, round {round_index + 1}/{options.rounds}: {_describe(config)}")
            try:
                time_steps(setup.unet, setup.batch, *config, setup.device, setup.autocast_dtype, options.warmup,
                           options.steps, results[config])
            except ImportError as error:
                results[config].note = f"skipped: {error}"
    profiles = profile_methods(options, setup, log) if options.profile else []
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    measured = [c for c in configs if not results[c].note]
    del setup.unet, setup.batch  # the child builds its own; two copies of a big UNet need not coexist
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="para-bench-") as temp:
        returning_malloc = inspect_configs(options, measured, results, options.keep_files or temp, log is not None)
    conditions_ = conditions(options, setup.device, setup.precision, setup.unet_description, setup.layers)
    conditions_["load_average"] = [load_before, load_after]
    conditions_["memory"] = ("torch.cuda.max_memory_allocated" if setup.device.type == "cuda" else
                             "sampled RSS" + (", glibc returning freed blocks" if returning_malloc else "")
                             ) + ", measured in a second process with the same UNet and batch"
    return {
        "conditions": conditions_,
        "results": [result_dict(results[c], results) for c in configs],
        "checks": target_checks(results, setup.layers),
        "profiles": profiles,
    }


# --------------------------------------------------------------------------------------------------
# Profiling: where the time goes, as self time per step above the floor


def op_times(unet, batch, method, rank, device, autocast_dtype, steps: int) -> dict[str, float]:
    """Self time per op and step (ms) under torch.profiler, after two untimed steps."""
    from torch.profiler import ProfilerActivity, profile

    with _Session(unet, method, rank, device) as session:
        session.batch = batch
        for _ in range(2):
            session.step(autocast_dtype)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                session.step(autocast_dtype)
            _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {event.key: getattr(event, key) / 1e3 / steps for event in prof.key_averages()}


def profile_methods(options, setup: _Setup, log) -> list[dict]:
    def times(method, rank):
        return op_times(setup.unet, setup.batch, method, rank, setup.device, setup.autocast_dtype,
                        options.profile_steps)

    floor = times("floor", None)
    profiles = []
    for method in options.profile:
        for rank in [None] if method in RANKLESS else options.ranks:
            if log:
                log(f"profiling {_describe((method, rank))}")
            measured = times(method, rank)
            extra = {op: measured.get(op, 0.0) - floor.get(op, 0.0) for op in set(measured) | set(floor)}
            top = sorted(extra.items(), key=lambda item: -abs(item[1]))[:options.profile_top]
            profiles.append({"method": method, "rank": rank, "total_ms": sum(measured.values()),
                             "floor_total_ms": sum(floor.values()),
                             "top_ops_extra_ms": [{"op": op, "ms": round(ms, 3)} for op, ms in top]})
    return profiles


# --------------------------------------------------------------------------------------------------
# The report


def result_dict(result: Result, results: dict) -> dict:
    lora = results.get(("peft-lora", result.rank))
    floor = results.get(("floor", None))
    step = result.step

    def ratio(other):
        return round(step / other.step, 3) if step and other and other.step else None

    data = asdict(result)
    data.update(step_median_s=step, step_min_s=min(result.step_seconds) if result.step_seconds else None,
                cpu_median_s=statistics.median(result.cpu_seconds) if result.cpu_seconds else None,
                step_vs_peft_lora=ratio(lora) if result.rank else None,
                step_vs_floor=ratio(floor),
                memory_vs_peft_lora=(round(result.peak_memory_bytes / lora.peak_memory_bytes, 3)
                                     if lora and lora.peak_memory_bytes and result.peak_memory_bytes is not None
                                     and result.rank else None),
                file_vs_peft_lora=(round(result.file_bytes / lora.file_bytes, 4)
                                   if lora and lora.file_bytes and result.file_bytes and result.rank else None))
    return data


def conditions(options, device, precision, unet_description, layers) -> dict:
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    for package in ("peft", "lycoris"):
        try:
            versions[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            versions[package] = None
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    d_out = sum(m.out_features for m in layers.values())
    d_in = sum(m.in_features for m in layers.values())
    return {"date": date.today().isoformat(), "device": device.type, "machine": machine, "precision": precision,
            "unet": unet_description, "latent_size": options.latent_size, "batch_size": options.batch_size,
            "ranks": options.ranks, "warmup": options.warmup, "steps": options.steps, "rounds": options.rounds,
            "targets": f"{len(layers)} layers: {TARGET_DESCRIPTION}", "sum_d_out": d_out, "sum_d_in": d_in,
            "optimizer": "torch.optim.AdamW(lr=1e-4), defaults", "versions": versions}


def target_checks(results: dict, layers) -> list[dict]:
    """The issue's targets for our PaRa, where this run measured what they need."""
    d_out = sum(m.out_features for m in layers.values())
    d_in = sum(m.in_features for m in layers.values())
    shape_ratio = d_out / (d_in + d_out)
    floor = results.get(("floor", None))
    checks = []

    def add(name, value, limit, ok):
        checks.append({"target": name, "value": round(value, 4), "limit": round(limit, 4), "met": bool(ok)})

    for (method, rank), para in results.items():
        if method != "para" or not para.step:
            continue
        lora, deft = results.get(("peft-lora", rank)), results.get(("peft-para", rank))
        if lora and lora.step:
            for at, limit in ((32, 0.9), (128, 0.75)):
                if rank == at:
                    add(f"step time / peft LoRA at r={rank}", para.step / lora.step, limit, para.step <= limit * lora.step)
            if para.peak_memory_bytes is not None and lora.peak_memory_bytes:
                add(f"peak memory / peft LoRA at r={rank}", para.peak_memory_bytes / lora.peak_memory_bytes, 1.0,
                    para.peak_memory_bytes <= lora.peak_memory_bytes)
            if para.file_bytes and lora.file_bytes:
                value = para.file_bytes / lora.file_bytes
                add(f"file size / peft LoRA at r={rank} (shape ratio {shape_ratio:.4f} +-1%)", value,
                    shape_ratio * 1.01, abs(value / shape_ratio - 1) <= 0.01)
        if deft and deft.step:
            add(f"step time / peft PaRa at r={rank}", para.step / deft.step, 1.0, para.step <= deft.step)
        if rank == 32 and floor and floor.step:
            add("overhead over the floor at r=32", para.step / floor.step - 1, 0.15, para.step <= 1.15 * floor.step)
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
             f"step = median (and min) of {c['rounds']} rounds x {c['steps']} steps after {c['warmup']} warm-up "
             f"step(s), methods interleaved; load average {c['load_average'][0]} before, {c['load_average'][1]} after",
             f"memory = peak above the frozen model during a step ({c['memory']}), with the adapter's parameters "
             "and optimizer state", ""]
    header = ("method", "rank", "layers", "params", "file", "step ms", "min ms", "x LoRA", "x floor", "memory",
              "mem x LoRA")
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
                        help="CI mode: tiny UNet, 8x8 latents, ranks 2,4, one round of 2 steps")


def run(options) -> int:
    if options.smoke:
        options.unet, options.latent_size, options.rounds, options.steps, options.warmup = "tiny", 8, 1, 2, 0
        if options.ranks == [4, 32, 128]:
            options.ranks = [2, 4]
    for name in ("latent_size", "batch_size", "steps", "rounds"):
        if getattr(options, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    if options.warmup < 0:
        raise BenchError("--warmup must be 0 or more")
    # The adapters' own creation logs (LyCORIS, KronA, PaRa: one block per attach) would drown the progress.
    quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        report = run_bench(options, log=lambda message: print(message, file=sys.stderr, flush=True))
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
