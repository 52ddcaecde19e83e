"""sd-scripts' train_network.py command line, --config_file and --output_config, for para-trainer.

The options are generated from sd_scripts_args.tsv (dumped from sd-scripts' live parser), so names, types,
defaults and choices are sd-scripts' own. On top of what sd-scripts does, this module rejects what sd-scripts
would silently accept: unknown or mistyped TOML keys, and options para-trainer does not implement (the policy
tables below: SUPPORTED, HARMLESS, everything else unsupported).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import toml

TABLE_PATH = Path(__file__).with_name("sd_scripts_args.tsv")


class ArgsError(ValueError):
    """A bad command line or config file; the message names the option, key or file and what to do."""


@dataclass(frozen=True)
class OptionSpec:
    name: str  # without the leading "--"
    action: str  # "Store" or "StoreTrue"
    type_name: str  # str, int, float, bool, Path or int_or_float
    nargs: str | None  # None or "*"
    default: object
    choices: tuple | None


def int_or_float(text: str) -> int | float:
    """sd-scripts' step-or-ratio type: "100" -> 100 steps, "0.1" -> ratio 0.1 of the steps, "10%" -> 0.1."""
    text = text.strip()
    try:
        number = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step count, a ratio below 1 or a percentage") from None
    if text.endswith("%") or number < 1:
        return number
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r}: a step count must be a whole number (a ratio must be below 1)")
    return int(number)


TYPES = {"str": str, "int": int, "float": float, "Path": Path, "int_or_float": int_or_float}


def _parse_choices(text: str, type_name: str) -> tuple | None:
    if not text:
        return None
    convert = {"int": int, "float": float}.get(type_name, str)
    return tuple(None if choice == "None" else convert(choice) for choice in text.split(","))


def read_option_table(path: str | os.PathLike = TABLE_PATH) -> list[OptionSpec]:
    """The TSV's rows: option, action, type, nargs (None, 0 or *), default (a Python repr), choices."""
    specs = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        if not line.strip():
            continue
        option, action, type_name, nargs, default, choices = line.split("\t")
        specs.append(OptionSpec(option.removeprefix("--"), action, type_name, "*" if nargs == "*" else None,
                                ast.literal_eval(default), _parse_choices(choices, type_name)))
    return specs


PARA_OPTIONS = (  # para-trainer's own
    OptionSpec("sdxl", "StoreTrue", "bool", None, False, None),
    OptionSpec("no_export_lora", "StoreTrue", "bool", None, False, None),
)
SDXL_SCRIPT_OPTIONS = (  # added by sdxl_train_network.py: accepted so SDXL configs run unchanged
    OptionSpec("cache_text_encoder_outputs", "StoreTrue", "bool", None, False, None),
    OptionSpec("cache_text_encoder_outputs_to_disk", "StoreTrue", "bool", None, False, None),
    OptionSpec("disable_mmap_load_safetensors", "StoreTrue", "bool", None, False, None),
)
FLUX_SCRIPT_OPTIONS = (  # added by flux_train_network.py (flux-contract §3.1), with its defaults
    OptionSpec("clip_l", "Store", "str", None, None, None),
    OptionSpec("t5xxl", "Store", "str", None, None, None),
    OptionSpec("ae", "Store", "str", None, None, None),
    OptionSpec("controlnet_model_name_or_path", "Store", "str", None, None, None),
    OptionSpec("t5xxl_max_token_length", "Store", "int", None, None, None),
    OptionSpec("apply_t5_attn_mask", "StoreTrue", "bool", None, False, None),
    OptionSpec("guidance_scale", "Store", "float", None, 3.5, None),
    OptionSpec("timestep_sampling", "Store", "str", None, "sigma", ("sigma", "uniform", "sigmoid", "shift", "flux_shift")),
    OptionSpec("sigmoid_scale", "Store", "float", None, 1.0, None),
    OptionSpec("model_prediction_type", "Store", "str", None, "sigma_scaled", ("raw", "additive", "sigma_scaled")),
    OptionSpec("discrete_flow_shift", "Store", "float", None, 3.0, None),
    OptionSpec("model_type", "Store", "str", None, "flux", ("flux", "chroma")),
    OptionSpec("text_encoder_batch_size", "Store", "int", None, None, None),
    OptionSpec("weighting_scheme", "Store", "str", None, "uniform",
               ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")),
    OptionSpec("logit_mean", "Store", "float", None, 0.0, None),
    OptionSpec("logit_std", "Store", "float", None, 1.0, None),
    OptionSpec("mode_scale", "Store", "float", None, 1.29, None),
    OptionSpec("blocks_to_swap", "Store", "int", None, None, None),
    OptionSpec("split_mode", "StoreTrue", "bool", None, False, None),
)
FLUX_ONLY = frozenset(spec.name for spec in FLUX_SCRIPT_OPTIONS)
OPTION_SPECS = tuple(read_option_table()) + PARA_OPTIONS + SDXL_SCRIPT_OPTIONS + FLUX_SCRIPT_OPTIONS
SPECS_BY_NAME = {spec.name: spec for spec in OPTION_SPECS}

# --------------------------------------------------------------------------------------------------
# Policy: what para-trainer does with each option

SUPPORTED_GROUPS = {
    "model": "pretrained_model_name_or_path v2 v_parameterization sdxl vae clip_skip max_token_length "
             "tokenizer_cache_dir no_half_vae",
    "data": "train_data_dir reg_data_dir prior_loss_weight caption_extension caption_extention shuffle_caption "
            "caption_separator keep_tokens caption_prefix caption_suffix caption_dropout_rate caption_tag_dropout_rate "
            "resolution enable_bucket min_bucket_reso max_bucket_reso bucket_reso_steps bucket_no_upscale flip_aug "
            "random_crop cache_latents cache_latents_to_disk dataset_config dataset_repeats",
    "training": "max_train_steps max_train_epochs train_batch_size gradient_accumulation_steps gradient_checkpointing "
                "mixed_precision full_fp16 full_bf16 seed noise_offset min_snr_gamma max_grad_norm min_timestep "
                "max_timestep loss_type scale_weight_norms fp8_base fp8_base_unet",
    "optimizer": "optimizer_type optimizer_args use_8bit_adam use_lion_optimizer learning_rate unet_lr text_encoder_lr "
                 "lr_scheduler lr_warmup_steps lr_scheduler_num_cycles lr_scheduler_power",
    "attention": "xformers sdpa mem_eff_attn",
    "network": "network_module network_dim network_alpha network_args network_dropout network_weights dim_from_weights "
               "network_train_unet_only network_train_text_encoder_only base_weights base_weights_multiplier "
               "training_comment",
    "saving": "output_dir output_name save_model_as save_precision save_every_n_epochs save_every_n_steps "
              "save_last_n_epochs save_last_n_steps save_last_n_epochs_state save_last_n_steps_state save_state "
              "save_state_on_train_end resume no_metadata no_export_lora",
    "hub": "huggingface_repo_id huggingface_repo_type huggingface_path_in_repo huggingface_token "
           "huggingface_repo_visibility save_state_to_huggingface resume_from_huggingface async_upload",
    "sampling": "sample_prompts sample_every_n_steps sample_every_n_epochs sample_at_first sample_sampler",
    "logging": "logging_dir log_with log_prefix metadata_title metadata_author metadata_description metadata_license "
               "metadata_tags metadata_usage_hint metadata_trigger_phrase metadata_thumbnail metadata_merged_from "
               "metadata_preprocessor metadata_is_negative_embedding",
    "config": "config_file output_config",
    "flux": "clip_l t5xxl ae t5xxl_max_token_length apply_t5_attn_mask guidance_scale timestep_sampling "
            "sigmoid_scale model_prediction_type discrete_flow_shift model_type weighting_scheme logit_mean logit_std "
            "mode_scale",
}
SUPPORTED = frozenset(" ".join(SUPPORTED_GROUPS.values()).split())

# Supported options of which only some values are implemented: name -> (allowed values, reason).
SUPPORTED_VALUES = {
    "loss_type": (("l2", "l1"), "only the l2 and l1 losses are implemented (not huber or smooth_l1)"),
    "log_with": ((None, "tensorboard"), "only TensorBoard logging is implemented (not wandb)"),
    "model_type": (("flux",), "only FLUX.1 is implemented (not Chroma)"),
    "lr_scheduler": (("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
                     "use one of constant (the default), constant_with_warmup, linear, cosine, cosine_with_restarts, "
                     "polynomial"),
}


def _only_with(option: str) -> str:
    return f"has an effect only together with --{option}, which para-trainer rejects"


_SPEED = "changes only speed or memory use, not the trained adapter"
_LOGGING = "changes only console or tracker logging"
HARMLESS = {  # accepted; no effect on the adapter or the files written
    **dict.fromkeys(["console_log_level", "console_log_file", "console_log_simple", "log_tracker_name",
                     "log_tracker_config", "log_config"], _LOGGING),
    **dict.fromkeys(["wandb_run_name", "wandb_api_key"], "used only by --log_with wandb, which para-trainer rejects"),
    **dict.fromkeys(["max_data_loader_n_workers", "persistent_data_loader_workers", "lowram", "highvram",
                     "vae_batch_size", "skip_cache_check", "cache_info", "cpu_offload_checkpointing",
                     "disable_mmap_load_safetensors", "cache_text_encoder_outputs",
                     "cache_text_encoder_outputs_to_disk", "text_encoder_batch_size"], _SPEED),
    **dict.fromkeys(["torch_compile", "dynamo_backend"], "compilation changes only speed; para-trainer runs eagerly"),
    **dict.fromkeys(["ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph"],
                    "tunes only multi-GPU communication"),
    "token_warmup_min": _only_with("token_warmup_step"),
    "multires_noise_discount": _only_with("multires_noise_iterations"),
    "ip_noise_gamma_random_strength": _only_with("ip_noise_gamma"),
    **dict.fromkeys(["huber_schedule", "huber_c", "huber_scale"], _only_with("loss_type huber/smooth_l1")),
    **dict.fromkeys(["zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                     "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                     "fp16_master_weights_and_gradients"], _only_with("deepspeed")),
    **dict.fromkeys(["validation_seed", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"],
                    _only_with("validation_split")),
}

UNSUPPORTED_REASONS = {  # the rest is rejected when used; these say why, others get UNSUPPORTED_DEFAULT_REASON
    "deepspeed": "DeepSpeed is not implemented; para-trainer trains with plain accelerate",
    **dict.fromkeys(["in_json", "dataset_class"], "only DreamBooth folders and --dataset_config datasets are "
                    "implemented (no fine-tuning metadata or custom dataset classes)"),
    **dict.fromkeys(["alpha_mask", "masked_loss", "conditioning_data_dir"], "masked loss is not implemented"),
    **dict.fromkeys(["noise_offset_random_strength", "multires_noise_iterations", "ip_noise_gamma",
                     "adaptive_noise_scale", "zero_terminal_snr"],
                    "this noise option is not implemented (--noise_offset is)"),
    **dict.fromkeys(["scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "debiased_estimation_loss"],
                    "this loss weighting is not implemented (--min_snr_gamma is)"),
    **dict.fromkeys(["lr_scheduler_type", "lr_scheduler_args"],
                    "custom scheduler classes and arguments are not implemented; use --lr_scheduler"),
    **dict.fromkeys(["lr_decay_steps", "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio"],
                    "the schedulers that use it (warmup_stable_decay, inverse_sqrt, cosine_with_min_lr) "
                    "are not implemented"),
    **dict.fromkeys(["skip_until_initial_step", "initial_epoch", "initial_step"],
                    "starting at a chosen step or epoch is not implemented; use --resume with a saved state"),
    "save_n_epoch_ratio": "not implemented; use --save_every_n_epochs",
    "validation_split": "validation is not implemented",
    **dict.fromkeys(["keep_tokens_separator", "secondary_separator", "enable_wildcard", "token_warmup_step",
                     "caption_dropout_every_n_epochs", "weighted_captions"], "this caption feature is not implemented"),
    **dict.fromkeys(["color_aug", "face_crop_aug_range"],
                    "this augmentation is not implemented (--flip_aug and --random_crop are)"),
    "resize_interpolation": "choosing the resize interpolation is not implemented",
    "debug_dataset": "the dataset viewer is not implemented",
    "fused_backward_pass": "it changes how the optimizer steps and is not implemented",
    **dict.fromkeys(["blocks_to_swap", "split_mode"],
                    "swapping FLUX blocks between GPU and CPU memory is not implemented in para-trainer's trainer "
                    "(use --gradient_checkpointing; for 12-16 GB GPUs train in sd-scripts' flux_train_network.py "
                    "with --network_module=networks.para, where --blocks_to_swap works)"),
    "controlnet_model_name_or_path": "ControlNet training is not implemented",
}
UNSUPPORTED_DEFAULT_REASON = "para-trainer does not implement it"


def policy_of(name: str) -> tuple[str, str]:
    """("supported" | "harmless" | "unsupported", reason) for an option name without "--"."""
    if name in SUPPORTED:
        return "supported", ""
    if name in HARMLESS:
        return "harmless", HARMLESS[name]
    return "unsupported", UNSUPPORTED_REASONS.get(name, UNSUPPORTED_DEFAULT_REASON)


def _in_use(value, default) -> bool:
    # sd-scripts tests these options for truth, so 0, "", [] and False leave them off as the default does
    return value != default and bool(value)


# --------------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print and sys.exit(2); the trainer's main reports ArgsError
        raise ArgsError(message)


def _help(spec: OptionSpec) -> str:
    status, reason = policy_of(spec.name)
    text = {"supported": "", "harmless": f"accepted, no effect: {reason}; ",
            "unsupported": f"rejected: {reason}; "}[status]
    if spec.name in SUPPORTED_VALUES:
        text = f"{SUPPORTED_VALUES[spec.name][1]}; "
    return text.replace("%", "%%") + "default: %(default)r"


PARA_HELP = {
    "sdxl": "treat the model as SDXL (sd-scripts chooses SDXL by running sdxl_train_network.py)",
    "no_export_lora": "do not also write the adapter in LoRA form",
}


def build_parser() -> argparse.ArgumentParser:
    """Every sd-scripts train_network.py option, as in the table, plus para-trainer's own."""
    parser = _Parser(prog="train_para.py", usage="%(prog)s [--config_file FILE] [sd-scripts options]",
                     description="Train a PaRa adapter with sd-scripts' train_network.py arguments; "
                     "--config_file reads them from a TOML file.")
    for spec in OPTION_SPECS:
        help_text = PARA_HELP.get(spec.name) or _help(spec)
        if spec.action == "StoreTrue":
            parser.add_argument(f"--{spec.name}", action="store_true", help=help_text)
        else:
            parser.add_argument(f"--{spec.name}", type=TYPES[spec.type_name], nargs=spec.nargs, default=spec.default,
                                choices=spec.choices, help=help_text)
    return parser


def _closest(name: str, candidates) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _parse_command_line(parser, argv: list[str], namespace=None) -> argparse.Namespace:
    args, extras = parser.parse_known_args(argv, namespace)
    if not extras:
        return args
    problems, value_expected = [], False
    for token in extras:
        if token.startswith("-"):
            option = token.split("=", 1)[0]
            guess = _closest(option.lstrip("-"), SPECS_BY_NAME)
            problems.append(f"unknown option {option}" + (f" (did you mean --{guess}?)" if guess else ""))
            value_expected = "=" not in token  # the next bare token is taken as this option's value
        elif value_expected:
            value_expected = False
        else:
            problems.append(f"unexpected argument {token!r}: options are written --name value")
    raise ArgsError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# --config_file: sd-scripts' read_config_from_file, with the keys and value types checked

IGNORED_TOML_KEYS = {"config_file", "output_config"}  # sd-scripts acts on these only from the command line
DATASET_TOML_KEYS = {"general", "datasets", "subsets", "image_dir", "class_tokens", "num_repeats", "is_reg",
                     "metadata_file", "batch_size"}


def _toml_path(config_file: str) -> str:
    return config_file if config_file.endswith(".toml") else config_file + ".toml"


def _read_toml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return toml.load(f)
    except FileNotFoundError:
        raise ArgsError(f"--config_file: {path} not found") from None
    except toml.TomlDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise ArgsError(f"{path}: TOML syntax error at {where}: {error.msg}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ArgsError(f"--config_file: cannot read {path}: {error}") from None


def _kind(value) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                       (list, "a list"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


def _toml_repr(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_repr(item) for item in value) + "]"
    return "{...}" if isinstance(value, dict) else repr(value)


def _toml_text(key: str, value) -> str:
    return f"{key} = {_toml_repr(value)}"


EXPECTED = {"str": "a string", "Path": "a path string", "int": "an integer", "float": "a number",
            "int_or_float": "a step count, a ratio below 1 or a percentage string", "bool": "true or false"}
EXPECTED_ITEMS = {"str": "strings", "Path": "path strings", "int": "integers", "float": "numbers"}


def _is_number(value, type_name: str) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (type_name != "int" and isinstance(value, float))


def _scalar(spec: OptionSpec, value):
    """The value as the command line would give it, or raise TypeError."""
    kind = spec.type_name
    if kind in ("str", "Path") and isinstance(value, str):
        return Path(value) if kind == "Path" else value
    if spec.name == "resolution" and _is_number(value, "int"):
        return str(value)  # sd-scripts splits the string; an int means a square size
    if spec.name == "resolution" and isinstance(value, list) and 1 <= len(value) <= 2 and \
            all(_is_number(v, "int") for v in value):
        return ",".join(str(v) for v in value)
    if kind in ("int", "float") and _is_number(value, kind):
        return value  # kept as written, as sd-scripts does (an int in a float option stays an int)
    if kind == "int_or_float":
        if isinstance(value, str):
            try:
                return int_or_float(value)
            except argparse.ArgumentTypeError as error:
                raise TypeError(str(error)) from None
        if _is_number(value, "int") or (isinstance(value, float) and value < 1):
            return value
        if isinstance(value, float):
            raise TypeError("a float is a ratio of the steps and must be below 1; write a step count without "
                            "a decimal point")
    raise TypeError(f"expected {EXPECTED[kind]}, got {_kind(value)}")


def _config_value(spec: OptionSpec, value):
    if spec.action == "StoreTrue":
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected {EXPECTED['bool']}, got {_kind(value)}")
    if spec.nargs == "*":
        if not isinstance(value, list):
            if _is_number(value, spec.type_name) and spec.type_name != "str":
                return [value]  # sd-scripts' backward compatibility: text_encoder_lr = 1e-4 means one rate
            example = _toml_text(spec.name, [value] if isinstance(value, str) else ["..."])
            raise TypeError(f"expected a list of {EXPECTED_ITEMS[spec.type_name]}, got {_kind(value)}; "
                            f"write {example}")
        return [_scalar(spec, item) for item in value]
    converted = _scalar(spec, value)
    if spec.choices is not None and converted not in spec.choices:
        allowed = ", ".join(repr(c) for c in spec.choices if c is not None)
        raise TypeError(f"not one of the choices: {allowed}")
    return converted


def read_config_file(path: str) -> dict:
    """A --config_file TOML as option values: sections flattened one level (their names are cosmetic)."""
    data, flat, places, problems = _read_toml(path), {}, {}, []
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for sub_key, sub_value in items:
            flat[sub_key] = sub_value
            places[sub_key] = f"{path} [{key}]" if isinstance(value, dict) else path
    values = {}
    for key, value in flat.items():
        if key in IGNORED_TOML_KEYS:
            continue
        if key not in SPECS_BY_NAME:
            if key in DATASET_TOML_KEYS:
                hint = " (a dataset setting: put it in the TOML file given with --dataset_config)"
            else:
                guess = _closest(key, SPECS_BY_NAME)
                hint = f" (did you mean '{guess}'?)" if guess else " (see train_para.py --help for the options)"
            problems.append(f"unknown key '{key}' in {places[key]}{hint}")
            continue
        try:
            values[key] = _config_value(SPECS_BY_NAME[key], value)
        except TypeError as error:
            problems.append(f"{_toml_text(key, value)} in {places[key]}: {error}")
    if problems:
        raise ArgsError("\n".join(problems))
    return values


# --------------------------------------------------------------------------------------------------
# Checks after merging


def _resolution_problem(resolution) -> str | None:
    parts = str(resolution).split(",")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return None
    return f"--resolution {resolution!r}: write SIZE or WIDTH,HEIGHT in pixels, e.g. 512 or 512,768"


def _value_problems(args) -> list[str]:
    """Numbers that cannot mean anything: caught here, before a model is loaded or a file written."""
    problems = []
    if args.network_dim is not None and args.network_dim < 1:
        problems.append(f"--network_dim {args.network_dim}: the rank must be a whole number above 0 (e.g. 4)")
    for option in ("learning_rate", "unet_lr"):
        value = getattr(args, option)
        if value is not None and value < 0:
            problems.append(f"--{option} {value}: a learning rate cannot be negative (e.g. 1e-4; 0 freezes the part)")
    te_lrs = args.text_encoder_lr if isinstance(args.text_encoder_lr, (list, tuple)) else [args.text_encoder_lr]
    if any(lr is not None and lr < 0 for lr in te_lrs):
        problems.append(f"--text_encoder_lr {args.text_encoder_lr}: a learning rate cannot be negative")
    if args.max_train_epochs is not None and args.max_train_epochs < 1:
        problems.append(f"--max_train_epochs {args.max_train_epochs}: train at least 1 epoch")
    elif args.max_train_epochs is None and args.max_train_steps < 1:
        problems.append(f"--max_train_steps {args.max_train_steps}: train at least 1 step (with 0 the adapter would "
                        "be saved untrained, and an untrained PaRa adapter is not a no-op: it already removes r "
                        "directions per layer)")
    return problems


def _combination_problems(args) -> list[str]:
    """The cross-option rules of sd-scripts that para-trainer keeps (its asserts, as clear messages)."""
    problems = []
    if args.use_8bit_adam and args.use_lion_optimizer:
        problems.append("--use_8bit_adam and --use_lion_optimizer cannot be used together; use --optimizer_type")
    for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if getattr(args, flag) and args.optimizer_type:
            problems.append(f"--{flag} (the old spelling of --optimizer_type {name}) cannot be used together with "
                            f"--optimizer_type {args.optimizer_type}; give only --optimizer_type")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        problems.append("--network_train_unet_only and --network_train_text_encoder_only together would train "
                        "nothing; give at most one")
    for flag, precision in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if getattr(args, flag) and args.mixed_precision != precision:
            problems.append(f"--{flag} requires --mixed_precision {precision}")
    if args.dim_from_weights and not args.network_weights:
        problems.append("--dim_from_weights reads the rank from --network_weights: give --network_weights too")
    if (args.fp8_base or args.fp8_base_unet) and args.mixed_precision not in ("bf16", "fp16"):
        problems.append("--fp8_base stores the base weights in fp8 and computes in --mixed_precision: give "
                        "--mixed_precision bf16 (or fp16)")
    if args.sdxl and args.v2:
        problems.append("--sdxl and --v2 cannot be used together: an SDXL model is not a v2 model")
    if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
        if not args.network_train_unet_only:
            problems.append("--cache_text_encoder_outputs needs --network_train_unet_only (a trained text encoder "
                            "cannot use cached outputs)")
        for option in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate"):
            if getattr(args, option):
                problems.append(f"--cache_text_encoder_outputs cannot be used with --{option} (the cached outputs "
                                "would not see the changed captions)")
    if (args.cache_latents or args.cache_latents_to_disk) and args.random_crop and args.dataset_config is None:
        problems.append("--cache_latents cannot be used with --random_crop (each epoch crops differently)")
    return problems + _hub_problems(args)


# Stable Diffusion options that sd-scripts' FLUX trainer ignores or that mean nothing for a flow-matching model
SD_ONLY_ON_FLUX = {
    "min_snr_gamma": "it weights epsilon/v losses by their SNR; FLUX's flow-matching loss has --weighting_scheme",
    "noise_offset": "sd-scripts' FLUX trainer draws plain noise",
    "clip_skip": "FLUX uses CLIP-L's pooled output and T5's last layer",
    "min_timestep": "FLUX draws its timesteps with --timestep_sampling",
    "max_timestep": "FLUX draws its timesteps with --timestep_sampling",
    "max_token_length": "FLUX reads 77 CLIP tokens and --t5xxl_max_token_length T5 tokens",
}


def check_model_options(args, kind: str) -> None:
    """Options of one architecture given for another: one ArgsError naming the option and the model."""
    specs = {spec.name: spec for spec in FLUX_SCRIPT_OPTIONS}
    if kind != "flux" and (args.fp8_base or args.fp8_base_unet):
        raise ArgsError("--fp8_base is implemented for FLUX.1 only here (on an SD UNet, fp8 storage through diffusers' "
                        "layerwise casting breaks the convolutions' backward); leave it out, or use --full_bf16")
    if kind != "flux":
        used = [name for name in sorted(FLUX_ONLY) if _in_use(getattr(args, name, None), specs[name].default)]
        if used:
            raise ArgsError(f"--{used[0]} is a FLUX.1 option (flux_train_network.py); "
                            f"{args.pretrained_model_name_or_path} is a Stable Diffusion model: leave it out")
        return
    for name, reason in SD_ONLY_ON_FLUX.items():
        if _in_use(getattr(args, name, None), SPECS_BY_NAME[name].default):
            raise ArgsError(f"--{name} is a Stable Diffusion option and {args.pretrained_model_name_or_path} is "
                            f"FLUX.1: {reason}. Leave it out")
    if args.t5xxl_max_token_length is not None and args.t5xxl_max_token_length < 1:
        raise ArgsError(f"--t5xxl_max_token_length {args.t5xxl_max_token_length}: give a whole number above 0 (sd-scripts"
                        " uses 512 for dev, 256 for schnell)")
    if args.guidance_scale < 0:
        raise ArgsError(f"--guidance_scale {args.guidance_scale}: the embedded guidance cannot be negative (sd-scripts' "
                        "docs use 1.0 for training FLUX.1 dev)")


def _hub_problems(args) -> list[str]:
    """sd-scripts' --huggingface_* options: values it would fail on late, and options that would do nothing."""
    problems = []
    if args.huggingface_repo_id:
        parts = args.huggingface_repo_id.split("/")
        if len(parts) > 2 or not all(parts):  # a bare REPO goes to the token's user, as in sd-scripts
            problems.append(f"--huggingface_repo_id {args.huggingface_repo_id!r}: write USER/REPO, ORG/REPO or REPO")
    else:
        for option in ("huggingface_repo_type", "huggingface_path_in_repo", "huggingface_repo_visibility",
                       "save_state_to_huggingface", "async_upload"):
            if getattr(args, option):
                problems.append(f"--{option} has an effect only together with --huggingface_repo_id USER/REPO")
    if args.huggingface_repo_type not in (None, "model", "dataset"):
        problems.append(f"--huggingface_repo_type {args.huggingface_repo_type!r}: use model (the default) or dataset")
    if args.huggingface_repo_visibility not in (None, "public", "private"):
        problems.append(f"--huggingface_repo_visibility {args.huggingface_repo_visibility!r}: use public or private "
                        "(default: private, as in sd-scripts)")
    if args.save_state_to_huggingface and not (args.save_state or args.save_state_on_train_end):
        problems.append("--save_state_to_huggingface uploads the states that --save_state or "
                        "--save_state_on_train_end write: give one of them")
    if args.resume_from_huggingface and not args.resume:
        problems.append("--resume_from_huggingface needs --resume USER/REPO/STATE_FOLDER[:REVISION[:REPO_TYPE]]")
    return problems


def check_args(args: argparse.Namespace) -> None:
    """Reject options para-trainer does not implement and combinations sd-scripts refuses; one message for all."""
    problems = []
    for spec in OPTION_SPECS:
        value = getattr(args, spec.name, spec.default)
        status, reason = policy_of(spec.name)
        if status == "unsupported" and _in_use(value, spec.default):
            problems.append(f"--{spec.name} is not supported by para-trainer: {reason}")
        elif spec.name in SUPPORTED_VALUES and value not in SUPPORTED_VALUES[spec.name][0]:
            problems.append(f"--{spec.name} {value} is not supported by para-trainer: {SUPPORTED_VALUES[spec.name][1]}")
    if args.resolution is not None and (problem := _resolution_problem(args.resolution)):
        problems.append(problem)
    problems += _value_problems(args)
    problems += _combination_problems(args)
    if problems:
        raise ArgsError("\n".join(problems))


# --------------------------------------------------------------------------------------------------
# Entry point


def _write_output_config(args: argparse.Namespace) -> None:
    """sd-scripts' --output_config: the values that differ from the defaults, to the --config_file path."""
    if not args.config_file:
        raise ArgsError("--output_config writes the settings to the --config_file path: give --config_file PATH")
    path = _toml_path(args.config_file)
    if os.path.exists(path):
        raise ArgsError(f"--output_config: {path} already exists and is never overwritten; choose a new "
                        "--config_file path")
    excluded = {"config_file", "output_config", "wandb_api_key"}
    values = {}
    for spec in OPTION_SPECS:
        value = getattr(args, spec.name)
        if spec.name not in excluded and value != spec.default:
            values[spec.name] = str(value) if isinstance(value, Path) else value  # toml cannot write a Path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(temp, "w", encoding="utf-8") as f:
        toml.dump(values, f)
    os.replace(temp, path)  # never a half-written config under its final name
    print(f"wrote the settings to {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """sd-scripts' arguments: command line > --config_file TOML > defaults, then checked (ArgsError if not ok).

    --output_config writes the command line's non-default values to --config_file and raises SystemExit(0).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = _parse_command_line(parser, argv)
    if args.output_config:
        check_args(args)
        _write_output_config(args)
        raise SystemExit(0)
    if args.config_file:
        values = read_config_file(_toml_path(args.config_file))
        # as sd-scripts: the TOML values fill the namespace first, so only options on the command line replace them
        args = _parse_command_line(parser, argv, argparse.Namespace(**values))
        args.config_file = os.path.splitext(args.config_file)[0]
    check_args(args)
    return args
