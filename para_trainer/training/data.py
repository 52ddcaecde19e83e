"""Training data the way sd-scripts reads it (kohya-contract §4.2): DreamBooth folders or a dataset config file.

    --train_data_dir / --reg_data_dir   parents of folders named "N_class tokens" (N = repeats)
    --dataset_config FILE               TOML or JSON: [general], [[datasets]], [[datasets.subsets]]

load_blueprints(args) resolves either into DatasetSpec objects (subset > dataset > general > argument > default);
TrainDataset(specs) scans the images, reads captions, assigns buckets and serves batches. Every random choice in a
batch (caption shuffle and dropout, flips, random crops) comes from the torch.Generator the caller passes, and the
batch order of an epoch depends only on (seed, epoch): a resumed or multi-process run sees the same data.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import toml
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger("para_trainer.training.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # sd-scripts' list (matched case-insensitively)


class DataError(ValueError):
    """Training data or dataset settings that cannot be used; the message names the folder, file or key."""


# --------------------------------------------------------------------------------------------------
# Resolved settings


@dataclass
class SubsetSpec:
    """One image folder with its caption and augmentation settings (sd-scripts' DreamBoothSubset)."""

    image_dir: str
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    random_crop: bool = False


@dataclass
class DatasetSpec:
    """Subsets trained at one resolution and batch size (sd-scripts' DreamBoothDataset)."""

    resolution: tuple[int, int]  # (width, height)
    subsets: list[SubsetSpec]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0


# --------------------------------------------------------------------------------------------------
# Dataset config keys: where each may appear, its type, and what para-trainer does with it

DATASET_KEYS = {"batch_size", "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps", "bucket_no_upscale", "network_multiplier", "validation_seed",
                "validation_split", "resize_interpolation"}
SUBSET_KEYS = {"num_repeats", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
               "secondary_separator", "enable_wildcard", "color_aug", "flip_aug", "face_crop_aug_range",
               "random_crop", "caption_prefix", "caption_suffix", "token_warmup_min", "token_warmup_step",
               "custom_attributes", "resize_interpolation", "caption_dropout_rate", "caption_dropout_every_n_epochs",
               "caption_tag_dropout_rate", "class_tokens", "caption_extension", "cache_info", "alpha_mask"}
SUBSET_ONLY_KEYS = {"image_dir", "is_reg", "metadata_file", "conditioning_data_dir"}

KEY_TYPES = {
    **dict.fromkeys(["shuffle_caption", "enable_wildcard", "color_aug", "flip_aug", "random_crop", "cache_info",
                     "alpha_mask", "is_reg", "enable_bucket", "bucket_no_upscale"], "bool"),
    **dict.fromkeys(["num_repeats", "keep_tokens", "token_warmup_min", "caption_dropout_every_n_epochs",
                     "batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "validation_seed"],
                    "int"),
    **dict.fromkeys(["caption_dropout_rate", "caption_tag_dropout_rate", "token_warmup_step", "network_multiplier",
                     "validation_split"], "number"),
    **dict.fromkeys(["caption_separator", "keep_tokens_separator", "secondary_separator", "caption_prefix",
                     "caption_suffix", "class_tokens", "caption_extension", "image_dir", "metadata_file",
                     "conditioning_data_dir", "resize_interpolation"], "str"),
    "resolution": "resolution", "face_crop_aug_range": "pair", "custom_attributes": "table",
}
TYPE_WORDS = {"bool": "true or false", "int": "an integer", "number": "a number", "str": "a string",
              "resolution": "an integer or [width, height]", "pair": "a list of two numbers", "table": "a table"}

# sd-scripts keys para-trainer does not implement: accepted only at the value that changes nothing.
UNSUPPORTED_KEYS = {
    "metadata_file": (None, "fine-tuning datasets (metadata_file) are not supported; use image_dir with caption "
                            "files (DreamBooth style)"),
    "conditioning_data_dir": (None, "ControlNet datasets are not supported"),
    "color_aug": (False, "this augmentation is not implemented (flip_aug and random_crop are)"),
    "face_crop_aug_range": (None, "this augmentation is not implemented (flip_aug and random_crop are)"),
    "keep_tokens_separator": ("", "this caption feature is not implemented (keep_tokens is)"),
    "secondary_separator": (None, "this caption feature is not implemented"),
    "enable_wildcard": (False, "this caption feature is not implemented"),
    "token_warmup_step": (0, "this caption feature is not implemented"),
    "caption_dropout_every_n_epochs": (0, "this caption feature is not implemented (caption_dropout_rate is)"),
    "alpha_mask": (False, "masked loss is not implemented"),
    "custom_attributes": ({}, "custom attributes (such as diff_output_preservation) are not implemented"),
    "network_multiplier": (1, "per-dataset network multipliers are not implemented"),
    "validation_split": (0, "validation is not implemented"),
    "resize_interpolation": (None, "para-trainer resizes as sd-scripts does by default (area when shrinking, "
                                   "Lanczos when enlarging); other interpolations are not implemented"),
}

# Values when neither the config nor the arguments give one (sd-scripts' dataclass defaults).
SUBSET_DEFAULTS = {name: f.default for name, f in SubsetSpec.__dataclass_fields__.items() if name != "image_dir"}
DATASET_DEFAULTS = {name: f.default for name, f in DatasetSpec.__dataclass_fields__.items()
                    if name not in ("resolution", "subsets", "prior_loss_weight")}


# --------------------------------------------------------------------------------------------------
# load_blueprints: arguments and dataset config -> DatasetSpec list


def load_blueprints(args) -> list[DatasetSpec]:
    """The datasets to train on, from --dataset_config or else --train_data_dir/--reg_data_dir."""
    argument_layer = _argument_layer(args)
    config_path = getattr(args, "dataset_config", None)
    if config_path is not None:
        config_path = os.fspath(config_path)
        for ignored in ("train_data_dir", "reg_data_dir", "in_json"):
            if getattr(args, ignored, None) is not None:
                logger.warning("--%s is ignored because --dataset_config is given (as in sd-scripts)", ignored)
        config = read_dataset_config(config_path)
        general, datasets = config.get("general", {}), config.get("datasets", [])
        if not datasets:
            raise DataError(f"{config_path}: no [[datasets]] table; add one with at least one [[datasets.subsets]] "
                            "holding image_dir")
    else:
        general, datasets = {}, [{"subsets": _subsets_from_folders(args)}]
    prior_loss_weight = getattr(args, "prior_loss_weight", None)
    prior_loss_weight = 1.0 if prior_loss_weight is None else float(prior_loss_weight)
    specs = []
    for number, dataset in enumerate(datasets, 1):
        name = f"{config_path} dataset #{number}" if config_path else "the dataset"
        if not dataset.get("subsets"):
            raise DataError(f"{name} has no [[datasets.subsets]]; add one with image_dir")
        layers = [dataset, general, argument_layer]
        subsets = [_subset_spec([subset] + layers) for subset in dataset["subsets"]]
        spec = DatasetSpec(resolution=_pick("resolution", layers, None), subsets=subsets,
                           prior_loss_weight=prior_loss_weight,
                           **{key: _pick(key, layers, default) for key, default in DATASET_DEFAULTS.items()})
        _check_dataset_spec(spec, name)
        specs.append(spec)
    return specs


def read_dataset_config(path: str) -> dict:
    """A dataset config file, read and checked: unknown keys, misplaced keys, wrong types, unsupported values."""
    if not os.path.isfile(path):
        raise DataError(f"--dataset_config {path}: file not found")
    if not path.lower().endswith((".toml", ".json")):
        raise DataError(f"--dataset_config {path}: the file name must end in .toml or .json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f) if path.lower().endswith(".json") else toml.load(f)
    except (ValueError, UnicodeDecodeError) as error:  # TomlDecodeError and JSONDecodeError are ValueErrors
        raise DataError(f"--dataset_config {path}: cannot parse it: {error}") from None
    if not isinstance(config, dict):
        raise DataError(f"--dataset_config {path}: expected a table with [general] and [[datasets]]")
    problems = []
    for key in config:
        if key not in ("general", "datasets"):
            problems.append(_unknown_key(key, path, "the top level", {"general", "datasets"}))
    general = config.get("general", {})
    if not isinstance(general, dict):
        problems.append(f"{path}: [general] must be a table")
    else:
        problems += _check_table(general, path, "[general]", DATASET_KEYS | SUBSET_KEYS)
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        problems.append(f"{path}: datasets must be written as [[datasets]] tables")
        datasets = []
    for d_number, dataset in enumerate(datasets, 1):
        where = f"[[datasets]] #{d_number}"
        problems += _check_table(dataset, path, where, DATASET_KEYS | SUBSET_KEYS | {"subsets"})
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            problems.append(f"{path} {where}: subsets must be written as [[datasets.subsets]] tables")
            continue
        for s_number, subset in enumerate(subsets, 1):
            sub_where = f"[[datasets.subsets]] #{s_number} of dataset #{d_number}"
            problems += _check_table(subset, path, sub_where, SUBSET_KEYS | SUBSET_ONLY_KEYS)
            if "image_dir" not in subset and "metadata_file" not in subset:
                problems.append(f"{path} {sub_where}: image_dir is required (the folder holding the images)")
    if problems:
        raise DataError("\n".join(problems))
    return config


def _check_table(table: dict, path: str, where: str, allowed: set[str]) -> list[str]:
    problems = []
    for key, value in table.items():
        if key == "subsets" and "subsets" in allowed:
            continue
        if key not in allowed:
            if key in DATASET_KEYS:
                problems.append(f"{path} {where}: '{key}' is a dataset setting; put it in [[datasets]] or [general]")
            elif key in SUBSET_ONLY_KEYS:
                problems.append(f"{path} {where}: '{key}' belongs in a [[datasets.subsets]] table")
            else:
                problems.append(_unknown_key(key, path, where, DATASET_KEYS | SUBSET_KEYS | SUBSET_ONLY_KEYS))
            continue
        kind = KEY_TYPES[key]
        if not _has_type(value, kind):
            problems.append(f"{path} {where}: {key} must be {TYPE_WORDS[kind]}, got {value!r}")
        elif key in UNSUPPORTED_KEYS and value != UNSUPPORTED_KEYS[key][0] and \
                not (key == "keep_tokens_separator" and value is None):
            problems.append(f"{path} {where}: {key} is not supported by para-trainer: {UNSUPPORTED_KEYS[key][1]}")
    return problems


def _unknown_key(key: str, path: str, where: str, known: set[str]) -> str:
    guess = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{guess[0]}'?)" if guess else " (see sd-scripts' dataset config documentation)"
    return f"{path} {where}: unknown key '{key}'{hint}"


def _has_type(value, kind: str) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return is_int
    if kind == "number":
        return is_int or isinstance(value, float)
    if kind == "str":
        return isinstance(value, str)
    if kind == "table":
        return isinstance(value, dict)
    if kind == "pair":
        return isinstance(value, list) and len(value) == 2 and all(_has_type(v, "number") for v in value)
    return (is_int and value > 0) or (isinstance(value, list) and len(value) == 2 and
                                      all(_has_type(v, "int") and v > 0 for v in value))


def _argument_layer(args) -> dict:
    """The command-line values that act as fallbacks, under the dataset config's key names."""
    names = ["caption_extension", "shuffle_caption", "caption_separator", "keep_tokens", "caption_prefix",
             "caption_suffix", "caption_dropout_rate", "caption_tag_dropout_rate", "flip_aug", "random_crop",
             "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"]
    layer = {name: getattr(args, name, None) for name in names}
    layer["batch_size"] = getattr(args, "train_batch_size", None)
    layer["num_repeats"] = getattr(args, "dataset_repeats", None)
    if getattr(args, "caption_extention", None) is not None:
        logger.warning("--caption_extention is the old spelling of --caption_extension; it is used as that")
        layer["caption_extension"] = args.caption_extention
    layer["resolution"] = parse_resolution(getattr(args, "resolution", None))
    return layer


def parse_resolution(value) -> tuple[int, int] | None:
    """sd-scripts' resolution forms: "512", "512,768" (width,height), 512, [512, 768]; None stays None."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) \
        else [value]
    try:
        sizes = [int(str(p).strip()) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise DataError(f"resolution {value!r}: write SIZE or WIDTH,HEIGHT in pixels, e.g. 512 or 512,768")
    return (sizes[0], sizes[-1])


def _pick(key: str, layers: list[dict], default):
    """sd-scripts' fallback: the first layer with a value that is not None."""
    for layer in layers:
        if layer.get(key) is not None:
            return layer[key]
    return default


def _subset_spec(layers: list[dict]) -> SubsetSpec:
    values = {name: _pick(name, layers, default) for name, default in SUBSET_DEFAULTS.items()}
    extension = values["caption_extension"]
    if extension and not extension.startswith("."):
        values["caption_extension"] = "." + extension  # as sd-scripts does
    return SubsetSpec(image_dir=layers[0]["image_dir"], **values)


def _check_dataset_spec(spec: DatasetSpec, name: str) -> None:
    if spec.resolution is None:
        raise DataError(f"{name}: resolution is required for DreamBooth datasets; give --resolution (e.g. 512 or "
                        "512,768) or resolution = 512 in the dataset config")
    spec.resolution = parse_resolution(spec.resolution)
    if spec.batch_size < 1:
        raise DataError(f"{name}: batch size {spec.batch_size} must be at least 1")
    for subset in spec.subsets:
        if subset.keep_tokens < 0:
            raise DataError(f"{subset.image_dir}: keep_tokens {subset.keep_tokens} must be 0 or more")
        for rate in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0 <= getattr(subset, rate) <= 1:
                raise DataError(f"{subset.image_dir}: {rate} {getattr(subset, rate)} must be between 0 and 1")
    if not spec.enable_bucket:
        return
    steps = spec.bucket_reso_steps
    if steps < 1:
        raise DataError(f"{name}: bucket_reso_steps {steps} must be at least 1")
    if spec.min_bucket_reso < steps:
        raise DataError(f"{name}: min_bucket_reso {spec.min_bucket_reso} is below bucket_reso_steps {steps}, so no "
                        f"bucket is possible; set min_bucket_reso to {steps} or more, or lower bucket_reso_steps")
    # sd-scripts rounds the limits to the step size, then requires the resolution to lie between them
    if spec.min_bucket_reso % steps:
        rounded = spec.min_bucket_reso - spec.min_bucket_reso % steps
        logger.warning("min_bucket_reso %d is rounded down to %d (a multiple of bucket_reso_steps %d)",
                       spec.min_bucket_reso, rounded, steps)
        spec.min_bucket_reso = rounded
    if spec.max_bucket_reso % steps:
        rounded = spec.max_bucket_reso + steps - spec.max_bucket_reso % steps
        logger.warning("max_bucket_reso %d is rounded up to %d (a multiple of bucket_reso_steps %d)",
                       spec.max_bucket_reso, rounded, steps)
        spec.max_bucket_reso = rounded
    width, height = spec.resolution
    if min(width, height) < spec.min_bucket_reso:
        raise DataError(f"{name}: min_bucket_reso {spec.min_bucket_reso} is larger than the resolution "
                        f"{width}x{height}; set min_bucket_reso to {min(width, height)} or less "
                        "(--min_bucket_reso or min_bucket_reso in the dataset config)")
    if max(width, height) > spec.max_bucket_reso:
        raise DataError(f"{name}: max_bucket_reso {spec.max_bucket_reso} is smaller than the resolution "
                        f"{width}x{height}; set max_bucket_reso to {max(width, height)} or more")


def _subsets_from_folders(args) -> list[dict]:
    """sd-scripts' DreamBooth convention: every subfolder "N_class tokens" of the data folders is a subset."""
    train_dir, reg_dir = getattr(args, "train_data_dir", None), getattr(args, "reg_data_dir", None)
    if train_dir is None:
        raise DataError("no training data: give --train_data_dir (the parent of folders named like "
                        "'10_sks dog': repeats, underscore, class tokens) or --dataset_config")
    return _folder_subsets(os.fspath(train_dir), False, "--train_data_dir") + \
        (_folder_subsets(os.fspath(reg_dir), True, "--reg_data_dir") if reg_dir is not None else [])


def _folder_subsets(parent: str, is_reg: bool, option: str) -> list[dict]:
    if not os.path.isdir(parent):
        raise DataError(f"{option} {parent}: folder not found")
    subsets, loose_images = [], []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not os.path.isdir(path):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                loose_images.append(name)
            continue
        head, _, tail = name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            logger.warning("%s: folder '%s' is skipped: its name does not start with a repeat count (like '10_%s')",
                           option, name, name)
            continue
        if repeats < 1:
            logger.warning("%s: folder '%s' is skipped: repeat count %d is below 1", option, name, repeats)
            continue
        subsets.append({"image_dir": path, "num_repeats": repeats, "is_reg": is_reg, "class_tokens": tail})
    if not subsets:
        where = f" (it holds images directly, e.g. {loose_images[0]})" if loose_images else ""
        raise DataError(f"{option} {parent}: no folders named like '10_sks dog' (repeats, underscore, class tokens)"
                        f"{where}; {option} must be the parent of such folders")
    if loose_images:
        logger.warning("%s %s: %d images directly in it are ignored (only its N_class folders are read)",
                       option, parent, len(loose_images))
    return subsets


# --------------------------------------------------------------------------------------------------
# Buckets (sd-scripts' BucketManager)


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int, steps: int) -> list:
    """The predefined buckets: sides multiples of `steps` in [min_size, max_size], area <= the resolution's."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // steps) * steps)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def select_bucket(width: int, height: int, spec: DatasetSpec, predefined: list) -> tuple[tuple, tuple, float]:
    """(bucket (w, h), resized size before cropping, aspect error) for an image, as sd-scripts chooses them."""
    aspect = width / height
    if not spec.enable_bucket or not spec.bucket_no_upscale:
        bucket = (width, height) if (width, height) in predefined else \
            min(predefined, key=lambda reso: abs(reso[0] / reso[1] - aspect))  # first of the closest, as argmin
        # scale to cover the bucket, keeping the aspect ratio; the excess is cropped
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:  # bucket_no_upscale: shrink only, bucket = the resized size floored to the step
        steps = spec.bucket_reso_steps
        max_area = spec.resolution[0] * spec.resolution[1]
        resized = (width, height)
        if width * height > max_area:
            def to_steps(x: float) -> int:
                x = int(x + 0.5)
                return x - x % steps

            fit_width = math.sqrt(max_area * aspect)
            fit_height = max_area / fit_width
            w_rounded, h_rounded = to_steps(fit_width), to_steps(fit_height)
            h_for_w, w_for_h = to_steps(w_rounded / aspect), to_steps(h_rounded * aspect)
            error_w = abs(w_rounded / h_for_w - aspect) if h_for_w else math.inf
            error_h = abs(w_for_h / h_rounded - aspect) if h_rounded else math.inf
            if error_w < error_h:
                resized = (w_rounded, int(w_rounded / aspect + 0.5))
            else:
                resized = (int(h_rounded * aspect + 0.5), h_rounded)
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    return bucket, resized, bucket[0] / bucket[1] - aspect if bucket[1] else math.inf


# --------------------------------------------------------------------------------------------------
# Captions


def read_caption(image_path: str, subset: SubsetSpec) -> str | None:
    """The first line of <stem><caption_extension>, or None when there is no caption file."""
    caption_path = os.path.splitext(image_path)[0] + subset.caption_extension
    if subset.caption_extension and os.path.isdir(caption_path):
        raise DataError(f"caption file {caption_path} is a folder, not a text file; rename or move it")
    if not subset.caption_extension or not os.path.isfile(caption_path):
        return None
    try:
        with open(caption_path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise DataError(f"caption file {caption_path}: not UTF-8 text; save it as UTF-8") from None
    if not lines:
        raise DataError(f"caption file {caption_path} is empty; write a caption in it, or delete it to use the "
                        "class tokens")
    return lines[0].strip()


CAPTION_EXTENSIONS = (".caption", ".txt", ".tags")


def _check_other_caption_files(paths: list[str], subset: SubsetSpec) -> None:
    """No image has a caption with the configured extension: if they have captions under another common extension
    (.txt beside images while --caption_extension is left at .caption is the classic mistake), stop and say so."""
    for extension in CAPTION_EXTENSIONS:
        if extension == subset.caption_extension:
            continue
        found = sum(os.path.isfile(os.path.splitext(p)[0] + extension) for p in paths)
        if found:
            raise DataError(
                f"{subset.image_dir}: no image has a {subset.caption_extension or '(none)'} caption file, but {found} "
                f"of {len(paths)} have a {extension} file beside them. Give --caption_extension {extension} (or "
                f"caption_extension = \"{extension}\" in the dataset config) to train on those captions; to train on "
                "the folder's class tokens instead, move the files away")


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def process_caption(caption: str, subset: SubsetSpec, generator: torch.Generator) -> str:
    """sd-scripts' process_caption: prefix/suffix, caption dropout, then (with shuffle or tag dropout) the tags
    after the first keep_tokens are shuffled and dropped. Random draws come from `generator`."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    if subset.caption_dropout_rate > 0 and _uniform(generator) < subset.caption_dropout_rate:
        return ""
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0:
        tokens = [t.strip() for t in caption.strip().split(subset.caption_separator)]
        fixed, flexible = tokens[:subset.keep_tokens], tokens[subset.keep_tokens:]
        if subset.shuffle_caption:
            flexible = [flexible[i] for i in torch.randperm(len(flexible), generator=generator).tolist()]
        if subset.caption_tag_dropout_rate > 0:
            flexible = [t for t in flexible if _uniform(generator) >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flexible)  # sd-scripts joins with ", " whatever the separator
    return caption


# --------------------------------------------------------------------------------------------------
# The dataset


class ItemRef(NamedTuple):
    """One sample of a batch: an image of one of the datasets."""

    dataset: int
    image: int


@dataclass
class ImageEntry:
    path: str
    caption: str
    subset: SubsetSpec
    repeats: int  # per epoch; for regularization images, after balancing
    size: tuple[int, int]  # original (width, height)
    bucket: tuple[int, int]  # training (width, height)
    resized: tuple[int, int]  # size before cropping to the bucket
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None


@dataclass
class _Dataset:
    spec: DatasetSpec
    entries: list[ImageEntry] = field(default_factory=list)
    subsets: list[tuple[SubsetSpec, int]] = field(default_factory=list)  # (subset, images) of those used
    num_train_images: int = 0
    num_reg_images: int = 0  # with repeats, before balancing (what sd-scripts reports)
    tag_frequency: dict = field(default_factory=dict)
    buckets: dict = field(default_factory=dict)  # (w, h) -> [entry index, repeated]
    bucket_info: dict | None = None


def _list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise DataError(f"image folder not found: {folder} (relative paths are taken from the current folder, "
                        f"{os.getcwd()}, as in sd-scripts)")
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
            and os.path.isfile(os.path.join(folder, name))]


def _image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({error}); remove it or replace it with a valid image") \
            from None


class TrainDataset:
    """All training images of all datasets, with sd-scripts' repeats, captions, buckets and batching."""

    def __init__(self, specs: list[DatasetSpec]):
        self.specs = specs
        self.datasets = [self._build(spec) for spec in specs]
        self._epoch_cache: tuple[tuple[int, int], list] | None = None

    # ---- building

    def _build(self, spec: DatasetSpec) -> _Dataset:
        dataset = _Dataset(spec)
        reg_entries: list[ImageEntry] = []
        seen_dirs = set()
        for subset in spec.subsets:
            key = os.path.normpath(os.path.abspath(subset.image_dir))
            if key in seen_dirs:
                logger.warning("%s: the same folder is listed twice in a dataset; the second is ignored "
                               "(as in sd-scripts)", subset.image_dir)
                continue
            seen_dirs.add(key)
            paths = _list_images(subset.image_dir)
            if subset.num_repeats < 1:
                logger.warning("%s: num_repeats %d is below 1; the folder is not used", subset.image_dir,
                               subset.num_repeats)
                continue
            if not paths:
                logger.warning("no images found in %s; the folder is not used", subset.image_dir)
                continue
            dataset.subsets.append((subset, len(paths)))
            captions = self._captions(paths, subset)
            self._count_tags(dataset, subset, captions)
            entries = [ImageEntry(p, c, subset, subset.num_repeats, (0, 0), (0, 0), (0, 0))
                       for p, c in zip(paths, captions)]
            if subset.is_reg:
                dataset.num_reg_images += subset.num_repeats * len(paths)
                reg_entries += entries
            else:
                dataset.num_train_images += subset.num_repeats * len(paths)
                dataset.entries += entries
        if dataset.num_train_images == 0:
            folders = ", ".join(s.image_dir for s in spec.subsets if not s.is_reg) or "(no training folders)"
            raise DataError(f"no images found in {folders} ({', '.join(IMAGE_EXTENSIONS)}); put the training "
                            "images in these folders")
        dataset.entries += self._balance_reg(reg_entries, dataset.num_train_images, dataset.num_reg_images)
        self._assign_buckets(dataset)
        return dataset

    @staticmethod
    def _captions(paths: list[str], subset: SubsetSpec) -> list[str]:
        captions, missing, uncaptioned = [], 0, 0
        for path in paths:
            caption = read_caption(path, subset)
            if caption is None:
                uncaptioned += 1
                caption = subset.class_tokens
            if caption is None:
                missing += 1
                caption = ""
            captions.append(caption)
        if uncaptioned == len(paths):
            _check_other_caption_files(paths, subset)
        if missing:
            logger.warning("%s: %d images have neither a %s caption file nor class tokens; their caption is empty",
                           subset.image_dir, missing, subset.caption_extension)
        elif uncaptioned:
            logger.warning("%s: %d of %d images have no %s caption file; they are trained with the folder's class "
                           "tokens %r as their caption", subset.image_dir, uncaptioned, len(paths),
                           subset.caption_extension, subset.class_tokens)
        return captions

    @staticmethod
    def _count_tags(dataset: _Dataset, subset: SubsetSpec, captions: list[str]) -> None:
        counts = dataset.tag_frequency.setdefault(os.path.basename(os.path.normpath(subset.image_dir)), {})
        for caption in captions:
            for tag in caption.split(subset.caption_separator):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1

    @staticmethod
    def _balance_reg(reg_entries: list[ImageEntry], num_train: int, num_reg: int) -> list[ImageEntry]:
        """sd-scripts: regularization images are taken in order, then cycled one repeat at a time, until they
        add up to the training images (with repeats); extra ones are left out."""
        if not reg_entries:
            return []
        if num_reg > num_train:
            logger.warning("%d regularization images (with repeats) for %d training images: some are not used",
                           num_reg, num_train)
        used, total, first_pass = [], 0, True
        while total < num_train:
            for entry in reg_entries:
                if first_pass:
                    used.append(entry)
                    total += entry.repeats
                else:
                    entry.repeats += 1
                    total += 1
                if total >= num_train:
                    break
            first_pass = False
        return used

    @staticmethod
    def _assign_buckets(dataset: _Dataset) -> None:
        spec = dataset.spec
        if not spec.enable_bucket:
            predefined = [spec.resolution]
        elif not spec.bucket_no_upscale:
            predefined = make_bucket_resolutions(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso,
                                                 spec.bucket_reso_steps)
        else:
            predefined = []
            logger.info("bucket_no_upscale: min_bucket_reso and max_bucket_reso are ignored (as in sd-scripts)")
        errors = []
        for index, entry in enumerate(dataset.entries):
            entry.size = _image_size(entry.path)
            entry.bucket, entry.resized, error = select_bucket(*entry.size, spec, predefined)
            if min(entry.bucket) <= 0:
                raise DataError(f"{entry.path}: the image is {entry.size[0]}x{entry.size[1]}, smaller than "
                                f"bucket_reso_steps {spec.bucket_reso_steps} on one side, and bucket_no_upscale "
                                "does not enlarge images; use a larger image or smaller bucket_reso_steps")
            errors.append(abs(error))
            dataset.buckets.setdefault(entry.bucket, []).extend([index] * entry.repeats)
        dataset.buckets = dict(sorted(dataset.buckets.items()))
        if spec.enable_bucket:
            dataset.bucket_info = {
                "buckets": {i: {"resolution": list(reso), "count": len(items)}
                            for i, (reso, items) in enumerate(dataset.buckets.items())},
                "mean_img_ar_error": float(np.mean(errors)),
            }
            for i, info in dataset.bucket_info["buckets"].items():
                logger.info("bucket %d: resolution %s, count %d", i, tuple(info["resolution"]), info["count"])

    # ---- what the metadata reports

    @property
    def num_train_images(self) -> int:
        """Training images times their repeats, over all datasets."""
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        """Regularization images times their repeats, before balancing (sd-scripts' ss_num_reg_images)."""
        return sum(d.num_reg_images for d in self.datasets)

    @property
    def num_reg_samples(self) -> int:
        """Regularization samples per epoch after balancing: equals num_train_images when there are any."""
        return sum(e.repeats for d in self.datasets for e in d.entries if e.subset.is_reg)

    @property
    def tag_frequency(self) -> dict:
        """{folder name: {tag: images whose caption has it}}; a folder in several datasets counts once."""
        merged = {}
        for dataset in self.datasets:
            for name, counts in dataset.tag_frequency.items():
                merged.setdefault(name, counts)
        return merged

    def _dirs(self, is_reg: bool) -> dict:
        dirs = {}
        for dataset in self.datasets:
            for subset, count in dataset.subsets:
                if subset.is_reg != is_reg:
                    continue
                name = base = os.path.basename(os.path.normpath(subset.image_dir))
                number = 2
                while name in dirs:  # sd-scripts numbers a folder used again: "name (2)"
                    name, number = f"{base} ({number})", number + 1
                dirs[name] = {"n_repeats": subset.num_repeats, "img_count": count}
        return dirs

    @property
    def dataset_dirs(self) -> dict:
        """{training folder name: {"n_repeats": N, "img_count": n}} (ss_dataset_dirs)."""
        return self._dirs(is_reg=False)

    @property
    def reg_dataset_dirs(self) -> dict:
        """The same for regularization folders (ss_reg_dataset_dirs)."""
        return self._dirs(is_reg=True)

    @property
    def bucket_info(self) -> dict | None:
        """The first dataset's buckets (ss_bucket_info, written when there is one dataset); None without buckets."""
        return self.datasets[0].bucket_info

    def subset_summaries(self) -> list[dict]:
        """sd-scripts' ss_datasets: one dict per dataset with its subsets."""
        summaries = []
        for dataset in self.datasets:
            spec = dataset.spec
            subsets = [{
                "img_count": count, "num_repeats": s.num_repeats, "color_aug": False, "flip_aug": s.flip_aug,
                "random_crop": s.random_crop, "shuffle_caption": s.shuffle_caption, "keep_tokens": s.keep_tokens,
                "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False,
                "caption_prefix": s.caption_prefix, "caption_suffix": s.caption_suffix,
                "resize_interpolation": None, "image_dir": os.path.basename(os.path.normpath(s.image_dir)),
                "class_tokens": s.class_tokens, "is_reg": s.is_reg,
            } for s, count in dataset.subsets]
            summaries.append({
                "is_dreambooth": True, "batch_size_per_device": spec.batch_size,
                "num_train_images": dataset.num_train_images, "num_reg_images": dataset.num_reg_images,
                "resolution": list(spec.resolution), "enable_bucket": spec.enable_bucket,
                "min_bucket_reso": spec.min_bucket_reso if spec.enable_bucket else None,
                "max_bucket_reso": spec.max_bucket_reso if spec.enable_bucket else None,
                "tag_frequency": dataset.tag_frequency, "bucket_info": dataset.bucket_info,
                "resize_interpolation": None, "subsets": subsets,
            })
        return summaries

    def check_bucket_reso_steps(self, multiple: int) -> None:
        """sd-scripts requires bucket_reso_steps to be a multiple of 64 (SD1/SD2) or 32 (SDXL)."""
        for spec in self.specs:
            if spec.enable_bucket and spec.bucket_reso_steps % multiple:
                raise DataError(f"bucket_reso_steps {spec.bucket_reso_steps} must be a multiple of {multiple} for "
                                "this model")

    # ---- batches

    @property
    def num_batches_per_epoch(self) -> int:
        return sum(math.ceil(len(items) / d.spec.batch_size) for d in self.datasets for items in d.buckets.values())

    def batches_for_epoch(self, epoch: int, seed: int) -> list[list[ItemRef]]:
        """The epoch's batches in order: shuffled within buckets, then as batches; depends only on (seed, epoch).
        Every batch holds images of one bucket of one dataset. The list is shared: do not modify it."""
        if self._epoch_cache is not None and self._epoch_cache[0] == (seed, epoch):
            return self._epoch_cache[1]
        rng = random.Random(f"para-trainer batches {seed} {epoch}")  # str seeds hash the same in every process
        batches = []
        for d_index, dataset in enumerate(self.datasets):
            size = dataset.spec.batch_size
            for items in dataset.buckets.values():
                items = list(items)
                rng.shuffle(items)
                batches += [[ItemRef(d_index, i) for i in items[start:start + size]]
                            for start in range(0, len(items), size)]
        rng.shuffle(batches)
        self._epoch_cache = ((seed, epoch), batches)
        return batches

    def entry(self, ref: ItemRef) -> ImageEntry:
        return self.datasets[ref.dataset].entries[ref.image]

    def load_batch(self, refs: list[ItemRef], generator: torch.Generator) -> dict:
        """Captions (processed), loss weights, and "images" (B,3,H,W) in [-1, 1], or "latents" when cached.
        Per sample, random draws happen in this order: caption, flip, crop."""
        entries = [self.entry(ref) for ref in refs]
        if len({e.bucket for e in entries}) != 1:
            raise ValueError("a batch must hold images of one bucket")
        captions, weights, flips, tensors = [], [], [], []
        cached = entries[0].latents is not None
        for ref, entry in zip(refs, entries):
            subset = entry.subset
            captions.append(process_caption(entry.caption, subset, generator))
            weights.append(self.datasets[ref.dataset].spec.prior_loss_weight if subset.is_reg else 1.0)
            flip = subset.flip_aug and _uniform(generator) < 0.5
            flips.append(flip)
            if cached:
                tensors.append(entry.latents_flipped if flip else entry.latents)
            else:
                image = load_image(entry, generator if subset.random_crop else None)
                tensors.append(image.flip(-1) if flip else image)
        batch = {"captions": captions, "loss_weights": torch.tensor(weights, dtype=torch.float32),
                 "flipped": flips}
        batch["latents" if cached else "images"] = torch.stack(tensors)
        return batch

    # ---- latents

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], to_disk: bool,
                      batch_size: int = 1) -> None:
        """Encode every image once (centre crop, no flip) and keep the latents in memory; with to_disk also in
        `<image stem>_<w>x<h>.npz` next to the image, reused when its shape fits. With flip_aug the flipped image
        is encoded too, so flips still happen per step."""
        for spec in self.specs:
            for subset in spec.subsets:
                if subset.random_crop:
                    raise DataError(f"{subset.image_dir}: --cache_latents cannot be used with random_crop (each "
                                    "step crops differently); turn one of them off")
        entries = [e for d in self.datasets for e in d.entries]
        pending = [e for e in entries if not (to_disk and _read_latent_cache(e))]
        pending.sort(key=lambda e: e.bucket)
        groups: list[list[ImageEntry]] = []
        for entry in pending:  # batches of one bucket, at most batch_size images
            if groups and groups[-1][0].bucket == entry.bucket and len(groups[-1]) < batch_size:
                groups[-1].append(entry)
            else:
                groups.append([entry])
        if pending:
            logger.info("caching latents of %d images%s", len(pending), " to disk" if to_disk else "")
        for group in groups:
            images = torch.stack([load_image(e, None) for e in group])
            latents = encode(images).detach().float().cpu()
            flipped_latents = encode(images.flip(-1)).detach().float().cpu() \
                if any(e.subset.flip_aug for e in group) else None
            for i, entry in enumerate(group):
                entry.latents = latents[i].clone()
                entry.latents_flipped = flipped_latents[i].clone() if entry.subset.flip_aug else None
                if to_disk:
                    _write_latent_cache(entry)


def latent_cache_path(entry: ImageEntry) -> str:
    return f"{os.path.splitext(entry.path)[0]}_{entry.bucket[0]}x{entry.bucket[1]}.npz"


def _read_latent_cache(entry: ImageEntry) -> bool:
    """Load the entry's latents from its npz when the file holds what this run needs."""
    path = latent_cache_path(entry)
    if not os.path.isfile(path):
        return False
    expected = (math.ceil(entry.bucket[1] / 8), math.ceil(entry.bucket[0] / 8))  # the VAE's 8x downscale
    try:
        with np.load(path) as data:
            latents = data["latents"]
            flipped = data["latents_flipped"] if "latents_flipped" in data.files else None
    except (OSError, ValueError, KeyError):
        return False
    if latents.ndim != 3 or tuple(latents.shape[-2:]) != expected:
        return False
    if entry.subset.flip_aug and (flipped is None or flipped.shape != latents.shape):
        return False
    entry.latents = torch.from_numpy(latents.astype(np.float32))
    entry.latents_flipped = torch.from_numpy(flipped.astype(np.float32)) if entry.subset.flip_aug else None
    return True


def _write_latent_cache(entry: ImageEntry) -> None:
    path = latent_cache_path(entry)
    arrays = {"latents": entry.latents.numpy(), "original_size": np.array(entry.size),
              "bucket_size": np.array(entry.bucket)}
    if entry.latents_flipped is not None:
        arrays["latents_flipped"] = entry.latents_flipped.numpy()
    temp = f"{path}.tmp-{os.getpid()}.npz"  # written whole, then renamed: processes may cache side by side
    np.savez(temp, **arrays)
    os.replace(temp, path)


# --------------------------------------------------------------------------------------------------
# Pixels


def load_image(entry: ImageEntry, generator: torch.Generator | None) -> torch.Tensor:
    """The image resized to cover its bucket and cropped to it: centred, or at a random offset drawn from
    `generator` when given. (3, H, W) in [-1, 1]."""
    try:
        with Image.open(entry.path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{entry.path}: cannot read the image ({error})") from None
    if image.size != entry.resized:
        shrinking = entry.resized[0] < image.width and entry.resized[1] < image.height
        image = image.resize(entry.resized, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
    (width, height), (bucket_w, bucket_h) = image.size, entry.bucket

    def offset(excess: int) -> int:
        if excess <= 0:
            return 0
        if generator is None:
            return excess // 2
        return int(torch.randint(0, excess + 1, (1,), generator=generator))

    left, top = offset(width - bucket_w), offset(height - bucket_h)
    image = image.crop((left, top, left + bucket_w, top + bucket_h))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0
