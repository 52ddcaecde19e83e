"""Sample images as sd-scripts makes them during training (`--sample_prompts`, `--sample_sampler`).

Prompt files are read in sd-scripts' three formats (`.txt` lines with `--w --h --d --s --l --n --ss` options,
`.toml` with `[prompt]` defaults and `[[prompt.subset]]` entries, `.json` lists), samplers map to the same
diffusers schedulers as sd-scripts' `get_my_scheduler`, and images are saved under `<output_dir>/sample/` with
sd-scripts' file names. Generation uses the model's own diffusers pipeline, so adapters hooked into its layers
apply. Unlike sd-scripts' long-prompt pipeline, prompts are cut at 77 tokens and `(word:1.2)` weights are text.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import secrets
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import toml
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

logger = logging.getLogger(__name__)


class SamplingError(ValueError):
    """A prompt file, sampler or sampling setting is wrong."""


DEFAULT_STEPS = 30  # sd-scripts' sample_image_inference defaults
DEFAULT_SCALE = 7.5
MIN_SIZE = 64

# sd-scripts' --sample_sampler choices -> (diffusers scheduler class, extra arguments), as get_my_scheduler.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers >= 0.27 refuses the first-order "dpmsolver" with its new default final sigma of zero;
    # sigma_min is what older diffusers (and so sd-scripts' pinned one) used.
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
# Not a --sample_sampler choice, but get_my_scheduler (so a prompt's --ss) accepts it.
_PROMPT_ONLY_SAMPLERS = {"ddpm": ("DDPMScheduler", {})}
_ALL_SAMPLERS = {**SAMPLERS, **_PROMPT_ONLY_SAMPLERS}
PNDM_MIN_STEPS = 4  # PNDM's Runge-Kutta warm-up (sd-scripts keeps it on) fails below this

# sd-scripts' noise schedule, used where the model's scheduler config does not say.
_SCHEDULE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear"}


@dataclass
class SamplePrompt:
    """One sample image to make; None means the default (sd-scripts': 30 steps, CFG 7.5, the run's sampler)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    scale: float | None = None
    sampler: str | None = None
    guidance: float | None = None  # --g: FLUX's embedded guidance (sd-scripts' default 3.5); no effect on SD


# ---------------------------------------------------------------------------------------------
# Prompt files

# Inline `.txt` options in sd-scripts' order (line_to_prompt_dict), each giving a prompt-dict key.
_LINE_OPTIONS = [
    (re.compile(r"w (\d+)", re.IGNORECASE), "width"),
    (re.compile(r"h (\d+)", re.IGNORECASE), "height"),
    (re.compile(r"d (\d+)", re.IGNORECASE), "seed"),
    (re.compile(r"s (\d+)", re.IGNORECASE), "sample_steps"),
    (re.compile(r"l ([\d\.]+)", re.IGNORECASE), "scale"),
    (re.compile(r"g ([\d\.]+)", re.IGNORECASE), "guidance_scale"),
    (re.compile(r"n (.+)", re.IGNORECASE), "negative_prompt"),
    (re.compile(r"ss (.+)", re.IGNORECASE), "sample_sampler"),
    (re.compile(r"cn (.+)", re.IGNORECASE), "controlnet_image"),
    (re.compile(r"ctr (.+)", re.IGNORECASE), "cfg_trunc_ratio"),
    (re.compile(r"rcfg (.+)", re.IGNORECASE), "renorm_cfg"),
]
# Keys sd-scripts reads only for other models (FLUX, Lumina) or ControlNet training: no effect on SD/SDXL samples.
_KEYS_WITHOUT_EFFECT = {"controlnet_image", "cfg_trunc_ratio", "renorm_cfg"}
_INT_KEYS = {"width": "width", "height": "height", "seed": "seed", "sample_steps": "steps"}


def read_prompt_file(path) -> list[SamplePrompt]:
    """The prompts of an sd-scripts `--sample_prompts` file (.txt, .toml or .json)."""
    path = Path(path)
    if not path.is_file():
        raise SamplingError(f"prompt file {path} not found")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise SamplingError(f"prompt file {path}: the name must end in .txt, .toml or .json, as in sd-scripts")
    text = path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows may add a byte-order mark
    if suffix == ".txt":
        # sd-scripts skips empty lines and lines starting with "#" (here also an indented "#").
        entries = [line.strip() for line in text.splitlines()]
        entries = [line for line in entries if line and not line.startswith("#")]
    elif suffix == ".toml":
        entries = _toml_entries(path, text)
    else:
        entries = _json_entries(path, text)
    if not entries:
        raise SamplingError(f"prompt file {path} has no prompts; add at least one (see sd-scripts' "
                            "--sample_prompts formats)")
    prompts = []
    for number, entry in enumerate(entries, start=1):
        where = f"prompt file {path}, prompt {number}"
        prompt_dict = _line_to_dict(entry, where) if isinstance(entry, str) else entry
        prompts.append(_prompt_from_dict(prompt_dict, where))
    return prompts


def _toml_entries(path: Path, text: str) -> list:
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as error:
        raise SamplingError(f"prompt file {path} is not valid TOML: {error}") from None
    table = data.get("prompt")
    subsets = table.get("subset") if isinstance(table, dict) else None
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise SamplingError(f"prompt file {path} needs a [prompt] table with [[prompt.subset]] entries "
                            "(the [prompt] keys are defaults for every subset)")
    defaults = {key: value for key, value in table.items() if key != "subset"}
    # sd-scripts builds dict(**defaults, **subset), which fails when a subset repeats a default; here it overrides.
    return [{**defaults, **subset} for subset in subsets]


def _json_entries(path: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SamplingError(f"prompt file {path} is not valid JSON: {error}") from None
    if not isinstance(data, list) or not all(isinstance(item, (dict, str)) for item in data):
        raise SamplingError(f"prompt file {path} must hold a JSON list of prompt objects "
                            '({"prompt": ..., "width": ...}) or prompt lines')
    return data


def _line_to_dict(line: str, where: str) -> dict:
    """A `.txt` prompt line as sd-scripts' line_to_prompt_dict reads it: options follow " --"."""
    prompt, *options = line.split(" --")
    prompt_dict: dict = {"prompt": prompt}
    for option in options:
        for pattern, key in _LINE_OPTIONS:
            match = pattern.match(option)
            if match:
                prompt_dict[key] = _line_value(key, match.group(1).strip(), where)
                break
        else:
            name, _, value = option.partition(" ")
            if name.lower() in _OPTION_VALUES:
                raise SamplingError(f"{where}: --{name} {value.strip() or '(no value)'}: write "
                                    f"{_OPTION_VALUES[name.lower()]}")
            logger.warning("%s: unknown option --%s is ignored (as sd-scripts does); options are --n --w --h --d "
                           "--s --l --ss", where, option)
    return prompt_dict


_OPTION_VALUES = {  # what a known option's value must be, for the message when it is not
    "w": "the width in pixels, a whole number (e.g. --w 512)",
    "h": "the height in pixels, a whole number (e.g. --h 512)",
    "d": "the seed, a whole number (e.g. --d 42)",
    "s": "the number of sampling steps, a whole number (e.g. --s 30)",
    "l": "the CFG scale, a number (e.g. --l 7.5)",
    "g": "the guidance scale, a number (e.g. --g 3.5)",
}


def _line_value(key: str, value: str, where: str):
    if key in ("width", "height", "seed"):
        return int(value)
    if key == "sample_steps":
        return max(1, min(1000, int(value)))  # sd-scripts clamps --s
    if key in ("scale", "guidance_scale"):
        try:
            return float(value)
        except ValueError:
            option = "--l" if key == "scale" else "--g"
            raise SamplingError(f"{where}: {option} {value} is not a number ({_OPTION_VALUES[option[2:]]})") from None
    return value


def _prompt_from_dict(prompt_dict: dict, where: str) -> SamplePrompt:
    unknown = set(prompt_dict) - {"prompt", "negative_prompt", "scale", "guidance_scale", "sample_sampler",
                                  *_INT_KEYS, *_KEYS_WITHOUT_EFFECT}
    if unknown:
        logger.warning("%s: unknown key(s) %s are ignored (as sd-scripts does)", where, ", ".join(sorted(unknown)))
    ignored = sorted(_KEYS_WITHOUT_EFFECT & set(prompt_dict))
    if ignored:
        logger.warning("%s: %s has no effect on SD/SDXL samples (sd-scripts uses it for other models or "
                       "ControlNet only) and is ignored", where, ", ".join(ignored))
    if "prompt" not in prompt_dict:
        raise SamplingError(f"{where} has no \"prompt\" key")
    fields = {"prompt": _text(prompt_dict, "prompt", where),
              "negative_prompt": _text(prompt_dict, "negative_prompt", where) or ""}
    for key, field in _INT_KEYS.items():
        value = prompt_dict.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise SamplingError(f"{where}: {key} must be a whole number, not {value!r}")
        fields[field] = value
    if fields["seed"] is not None and not -(2**63) <= fields["seed"] < 2**64:  # what torch's manual_seed takes
        raise SamplingError(f"{where}: seed {fields['seed']} is out of range (-2**63 to 2**64 - 1)")
    if fields["steps"] is not None and fields["steps"] < 1:
        raise SamplingError(f"{where}: sample_steps must be at least 1, not {fields['steps']}")
    scale = prompt_dict.get("scale")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise SamplingError(f"{where}: scale must be a number (the CFG scale), not {scale!r}")
    fields["scale"] = None if scale is None else float(scale)
    guidance = prompt_dict.get("guidance_scale")
    if guidance is not None and (not isinstance(guidance, (int, float)) or isinstance(guidance, bool)):
        raise SamplingError(f"{where}: guidance_scale must be a number (FLUX's guidance), not {guidance!r}")
    fields["guidance"] = None if guidance is None else float(guidance)
    sampler = _text(prompt_dict, "sample_sampler", where)
    fields["sampler"] = None if sampler is None else _check_sampler(sampler, where)
    return SamplePrompt(**fields)


def _text(prompt_dict: dict, key: str, where: str) -> str | None:
    value = prompt_dict.get(key)
    if value is not None and not isinstance(value, str):
        raise SamplingError(f"{where}: {key} must be text, not {value!r}")
    return value


def _check_sampler(name: str, where: str = "") -> str:
    normalized = name.strip().lower()
    if normalized not in _ALL_SAMPLERS:
        raise SamplingError(f"{where + ': ' if where else ''}unknown sampler {name!r}; choose one of "
                            f"{', '.join(SAMPLERS)}")
    return normalized


# ---------------------------------------------------------------------------------------------
# Schedulers


def make_scheduler(name: str, base_scheduler_config=None, prediction_type: str | None = None):
    """The diffusers scheduler sd-scripts samples with for `name`, predicting what the model predicts.

    The noise schedule and prediction type come from `base_scheduler_config` (the pipeline's scheduler config;
    sd-scripts' fixed schedule where it has none); `prediction_type` overrides the latter ("v_prediction" for
    a --v_parameterization model whose config says otherwise).
    """
    import diffusers

    name = _check_sampler(name)
    class_name, options = _ALL_SAMPLERS[name]
    scheduler_class = getattr(diffusers, class_name)
    base = dict(base_scheduler_config or {})
    arguments = {key: base.get(key, default) for key, default in _SCHEDULE_DEFAULTS.items()}
    arguments["prediction_type"] = prediction_type or base.get("prediction_type") or "epsilon"
    if "clip_sample" in inspect.signature(scheduler_class.__init__).parameters:
        arguments["clip_sample"] = True  # sd-scripts turns clip_sample on wherever a scheduler has it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dpmsolver.*deprecated", category=FutureWarning)
        try:
            return scheduler_class(**arguments, **options)
        except ImportError:  # diffusers' stand-in for a scheduler whose dependency is missing (LMS: scipy)
            raise SamplingError(f"sampler {name} needs scipy: pip install scipy") from None


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class GenerationSettings:
    """A SamplePrompt with the defaults filled in and the size rounded as sd-scripts does."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    scale: float
    sampler: str
    seed: int
    seed_is_random: bool

    def parameters_text(self, clip_skip: int | None = None) -> str:
        """The settings in AUTOMATIC1111's "parameters" format, which image viewers and web UIs read."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        details = (f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.scale:g}, Seed: {self.seed}, "
                   f"Size: {self.width}x{self.height}")
        if clip_skip and clip_skip > 1:
            details += f", Clip skip: {clip_skip}"
        return "\n".join(lines + [details])


def resolve_settings(prompt: SamplePrompt, default_sampler: str = "ddim",
                     default_size: tuple[int, int] = (512, 512)) -> GenerationSettings:
    """The settings an image for `prompt` is made with; a prompt without a seed gets a fresh random one."""
    width = prompt.width if prompt.width is not None else default_size[0]
    height = prompt.height if prompt.height is not None else default_size[1]
    seed = prompt.seed
    if seed is None:
        seed = secrets.randbelow(2**32)  # from the OS: no global RNG is consumed
    return GenerationSettings(
        prompt=prompt.prompt,
        negative_prompt=prompt.negative_prompt or "",
        width=max(MIN_SIZE, width - width % 8),  # sd-scripts: down to a multiple of 8, at least 64
        height=max(MIN_SIZE, height - height % 8),
        steps=prompt.steps if prompt.steps is not None else DEFAULT_STEPS,
        scale=prompt.scale if prompt.scale is not None else DEFAULT_SCALE,
        sampler=_check_sampler(prompt.sampler or default_sampler),
        seed=seed,
        seed_is_random=prompt.seed is None,
    )


def generate_image(pipe, prompt: SamplePrompt, default_sampler: str = "ddim",
                   default_size: tuple[int, int] = (512, 512), device=None, *, clip_skip: int | None = None,
                   prediction_type: str | None = None, autocast_dtype: torch.dtype | None = None) -> Image.Image:
    """One image for `prompt` with a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline.

    The pipeline's scheduler, its components' devices and torch's global RNG states are as before afterwards.
    `device`: where to run; components elsewhere (a VAE kept on the CPU) are moved there for the call.
    `clip_skip`: sd-scripts' --clip_skip (2 = the penultimate layer), for SD1/SD2; SDXL has fixed layers.
    `autocast_dtype`: run under torch.autocast, for pipelines whose components differ in precision.
    The image's info["parameters"] holds the settings (AUTOMATIC1111 format).
    """
    if type(pipe).__name__.startswith("Flux"):
        return _generate_flux_image(pipe, prompt, default_size, device)
    settings = resolve_settings(prompt, default_sampler, default_size)
    if settings.sampler == "pndm" and settings.steps < PNDM_MIN_STEPS:
        raise SamplingError(f"sampler pndm needs at least {PNDM_MIN_STEPS} steps, not {settings.steps}")
    scheduler = make_scheduler(settings.sampler, pipe.scheduler.config, prediction_type)
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    logger.info("sample: %r, negative %r, %dx%d, %d steps, scale %g, sampler %s, seed %d%s", settings.prompt,
                settings.negative_prompt, settings.width, settings.height, settings.steps, settings.scale,
                settings.sampler, settings.seed, " (random)" if settings.seed_is_random else "")

    original_scheduler = pipe.scheduler
    with _components_on(pipe, device) as run_device, _forked_rng(), torch.no_grad():
        autocast = (torch.autocast(run_device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        try:
            pipe.scheduler = scheduler
            text_inputs = {"prompt": settings.prompt, "negative_prompt": settings.negative_prompt}
            with autocast:
                if clip_skip and clip_skip > 1 and not is_sdxl:
                    # diffusers' own clip_skip needs transformers 4's text_model attribute; encode here instead.
                    text_inputs = {"prompt_embeds": _encode_sd_prompt(pipe, settings.prompt, clip_skip, run_device),
                                   "negative_prompt_embeds": _encode_sd_prompt(pipe, settings.negative_prompt,
                                                                               clip_skip, run_device)}
                # A CPU generator gives the same starting noise on every device.
                generator = torch.Generator("cpu").manual_seed(settings.seed)
                image = pipe(**text_inputs, height=settings.height, width=settings.width,
                             num_inference_steps=settings.steps, guidance_scale=settings.scale, generator=generator,
                             output_type="pil").images[0]
        finally:
            pipe.scheduler = original_scheduler
    image.info["parameters"] = settings.parameters_text(None if is_sdxl else clip_skip)
    return image


FLUX_DEFAULT_GUIDANCE = 3.5
FLUX_DEFAULT_STEPS = 20


def _generate_flux_image(pipe, prompt: SamplePrompt, default_size: tuple[int, int], device) -> Image.Image:
    """FLUX as sd-scripts samples it: Euler on the flow with FLUX's resolution-dependent shift (the pipeline's
    FlowMatchEulerDiscreteScheduler), the embedded guidance --g (3.5), 20 steps, sizes down to a multiple of 16;
    true CFG only when the prompt gives --l above 1 and a negative prompt."""
    width = prompt.width if prompt.width is not None else default_size[0]
    height = prompt.height if prompt.height is not None else default_size[1]
    width, height = max(MIN_SIZE, width - width % 16), max(MIN_SIZE, height - height % 16)
    steps = prompt.steps if prompt.steps is not None else FLUX_DEFAULT_STEPS
    guidance = prompt.guidance if prompt.guidance is not None else FLUX_DEFAULT_GUIDANCE
    seed = prompt.seed if prompt.seed is not None else secrets.randbelow(2**32)
    true_cfg = prompt.scale if prompt.scale and prompt.scale > 1 and prompt.negative_prompt else 1.0
    logger.info("sample: %r, %dx%d, %d steps, guidance %g, seed %d", prompt.prompt, width, height, steps, guidance,
                seed)
    with _components_on(pipe, device), _forked_rng(), torch.no_grad():
        image = pipe(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or None, true_cfg_scale=true_cfg,
                     height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                     max_sequence_length=min(512, pipe.tokenizer_2.model_max_length),
                     generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images[0]
    image.info["parameters"] = (f"{prompt.prompt}\nSteps: {steps}, Sampler: Euler (flow), Guidance: {guidance:g}, "
                                f"CFG scale: {true_cfg:g}, Seed: {seed}, Size: {width}x{height}")
    return image


def _encode_sd_prompt(pipe, text: str, clip_skip: int, device) -> torch.Tensor:
    """SD1/SD2 prompt embeddings from the clip_skip-th last layer, layer-normed, as sd-scripts computes them."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(hidden).to(text_encoder.dtype)


@contextlib.contextmanager
def _components_on(pipe, device):
    """Yield the device to run on; with `device` given, move stray components there and back afterwards."""
    if device is None:
        yield torch.device(pipe._execution_device)
        return
    device = torch.device(device)
    moved = {}
    for name, component in pipe.components.items():
        parameter = next(component.parameters(), None) if isinstance(component, torch.nn.Module) else None
        if parameter is not None and parameter.device != device:
            moved[name] = parameter.device
            component.to(device)
    try:
        yield device
    finally:
        for name, original_device in moved.items():
            pipe.components[name].to(original_device)


def _forked_rng():
    """Leave torch's global CPU (and initialised CUDA) RNG states as they were, so training does not depend on
    whether or how often samples are made."""
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda_devices)


# ---------------------------------------------------------------------------------------------
# Saving and comparing


def sample_images(pipe, prompts: list[SamplePrompt], output_dir, name: str | None, tag: str,
                  default_sampler: str = "ddim", default_size: tuple[int, int] = (512, 512), *, device=None,
                  clip_skip: int | None = None, prediction_type: str | None = None,
                  autocast_dtype: torch.dtype | None = None) -> list[Path]:
    """Make one image per prompt and save it as sd-scripts does; return the files.

    Files are `<output_dir>/sample/[<name>_]<tag>_<i:02d>_<YYYYmmddHHMMSS>[_<seed>].png`: `name` is
    --output_name (sd-scripts leaves the prefix out when it is None), `tag` is f"e{epoch:06d}" after an epoch or
    f"{step:06d}" after a step, and the seed suffix appears when the prompt sets a seed. The PNG's "parameters"
    text holds the settings, random seeds included.
    """
    save_dir = Path(output_dir) / "sample"
    save_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{name}_" if name else ""
    paths = []
    for index, prompt in enumerate(prompts):
        image = generate_image(pipe, prompt, default_sampler, default_size, device, clip_skip=clip_skip,
                               prediction_type=prediction_type, autocast_dtype=autocast_dtype)
        timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
        seed_suffix = "" if prompt.seed is None else f"_{prompt.seed}"
        path = save_dir / f"{prefix}{tag}_{index:02d}_{timestamp}{seed_suffix}.png"
        png_info = PngInfo()
        png_info.add_text("parameters", image.info["parameters"])
        image.save(path, pnginfo=png_info)
        paths.append(path)
    return paths


SHEET_NAME = "contact_sheet.png"  # the labelled grid `sample` and the trainer (on toy-sd1) write beside samples


def save_png(image, path: Path) -> None:
    """Write under a temporary name, then rename: no truncated image under the final name (A1111 parameters kept)."""
    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(temp, format="PNG", pnginfo=info)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


SAMPLE_FILE = re.compile(r"^(?P<prefix>.*?)(?P<tag>e?\d{6})_(?P<index>\d{2})_\d{14}(?:_\d+)?\.png$")


def parse_sample_name(filename: str) -> tuple[str, str, int] | None:
    """(prefix, tag, prompt index) of a file name sample_images writes ("mylora_" or "", "e000003", 0), else None."""
    match = SAMPLE_FILE.match(filename)
    return (match["prefix"], match["tag"], int(match["index"])) if match else None


_LABEL_PADDING = 4
_BACKGROUND = (255, 255, 255)
_TEXT_COLOR = (0, 0, 0)


def contact_sheet(images: list[list[Image.Image]], row_labels: list[str] | None = None,
                  column_labels: list[str] | None = None) -> Image.Image:
    """A grid of images (rows of columns) with row labels on the left and column labels on top.

    Every cell is as large as the largest image; smaller images sit at its top left, missing ones leave it blank.
    Without labels the sheet is exactly the grid.
    """
    rows = len(images)
    columns = max((len(row) for row in images), default=0)
    if rows == 0 or columns == 0:
        raise SamplingError("contact_sheet needs at least one image")
    if row_labels is not None and len(row_labels) != rows:
        raise SamplingError(f"contact_sheet: {len(row_labels)} row labels for {rows} rows")
    if column_labels is not None and len(column_labels) != columns:
        raise SamplingError(f"contact_sheet: {len(column_labels)} column labels for {columns} columns")
    cell_width = max(image.width for row in images for image in row)
    cell_height = max(image.height for row in images for image in row)

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    # Column labels wrap to the cell width (by characters: the default font is roughly fixed-width).
    char_width = max(1, text_size("M")[0])
    wrapped_columns = ["\n".join(textwrap.wrap(label, max(1, (cell_width - 2 * _LABEL_PADDING) // char_width)))
                       for label in column_labels] if column_labels is not None else None
    left_band = (max(text_size(label)[0] for label in row_labels) + 2 * _LABEL_PADDING) if row_labels else 0
    top_band = (max(text_size(label)[1] for label in wrapped_columns) + 2 * _LABEL_PADDING) \
        if wrapped_columns else 0

    sheet = Image.new("RGB", (left_band + columns * cell_width, top_band + rows * cell_height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(wrapped_columns or []):
        draw.multiline_text((left_band + column * cell_width + _LABEL_PADDING, _LABEL_PADDING), label,
                            fill=_TEXT_COLOR, font=font)
    for row, row_images in enumerate(images):
        y = top_band + row * cell_height
        if row_labels:
            draw.text((_LABEL_PADDING, y + _LABEL_PADDING), row_labels[row], fill=_TEXT_COLOR, font=font)
        for column, image in enumerate(row_images):
            sheet.paste(image.convert("RGB"), (left_band + column * cell_width, y))
    return sheet
