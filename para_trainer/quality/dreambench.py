"""DreamBench's metrics for real models: DINO, CLIP-I and CLIP-T of a folder of generated images, computed the way
the DreamBooth paper describes them, with the models given by Hub id or local folder (through transformers).

    DINO    mean cosine similarity of DINO ViT-S/16 CLS embeddings, every generated image against every real one
    CLIP-I  the same with CLIP's image embeddings
    CLIP-T  mean cosine similarity of each generated image's CLIP embedding with its own prompt's

``--pairing one`` pairs generated image i with real image i (modulo their number) instead of every pair, as the
DreamBench++ harness does; the numbers of the two conventions are not comparable. Scores are in [-1, 1] (the
papers print DINO and CLIP-I as they are and DreamBench++ ×100).

The DreamBooth data set's prompts (``dreambench_prompts``) are the 25 per subject of its prompts_and_classes.txt:
objects get 20 recontextualisations and 5 property changes, live subjects (cats, dogs) 10 recontextualisations,
10 accessories or outfits and the same 5 properties.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SKIPPED = ("contact_sheet.png",)  # `para-trainer sample`'s overview, not a sample

_PLACES = ("in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
           "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
           "with a blue house in the background", "on top of a purple rug in a forest")
_OBJECT_PLACES = ("with a wheat field in the background", "with a tree and autumn leaves in the background",
                  "with the Eiffel Tower in the background", "floating on top of water",
                  "floating in an ocean of milk", "on top of green grass with sunflowers around it",
                  "on top of a mirror", "on top of the sidewalk in a crowded street", "on top of a dirt road",
                  "on top of a white rug")
_OUTFITS = ("wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf",
            "wearing a black top hat and a monocle", "in a chef outfit", "in a firefighter outfit",
            "in a police outfit", "wearing pink glasses", "wearing a yellow shirt", "in a purple wizard outfit")
_PROPERTIES = ("red", "purple", "shiny", "wet", "cube shaped")


class DreamBenchError(Exception):
    """Bad input to the evaluator: one message naming the problem and what to do."""


def dreambench_prompts(identifier: str, class_noun: str, live: bool = False) -> list[str]:
    """The DreamBooth data set's 25 prompts for one subject ("a sks dog in the jungle", …, "a cube shaped sks dog")."""
    subject = f"{identifier} {class_noun}"
    places = _PLACES + (_OUTFITS if live else _OBJECT_PLACES)
    return [f"a {subject} {place}" for place in places] + [f"a {word} {subject}" for word in _PROPERTIES]


def prompt_file(prompts: list[str], images_per_prompt: int = 4) -> str:
    """sd-scripts' prompt-file syntax, one line per image (seeds 0, 1, …), for `para-trainer sample --prompts-file`
    or sd-scripts' own --sample_prompts."""
    lines = [f"{p} --d {seed}" for p in prompts for seed in range(images_per_prompt)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Reading the images and their prompts


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DreamBenchError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in SKIPPED and not p.name.startswith("."))
    if not files:
        raise DreamBenchError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB"), dict(image.info)
    except (UnidentifiedImageError, OSError) as error:
        raise DreamBenchError(f"{path}: not a readable image ({error})") from None


def prompt_of(path: Path, info: dict) -> str | None:
    """The image's prompt: a caption file beside it (IMAGE.txt, as sd-scripts' data sets have), else the first line
    of the PNG's A1111 ``parameters`` text (what A1111, Forge and `para-trainer sample` write)."""
    caption = path.with_suffix(".txt")
    if caption.is_file():
        return caption.read_text(encoding="utf-8").strip()
    parameters = info.get("parameters")
    if isinstance(parameters, str) and parameters.strip():
        return parameters.strip().splitlines()[0].strip()
    return None


# --------------------------------------------------------------------------------------------------
# The models


def _pretrained(cls, name: str, what: str, option: str):
    try:
        return cls.from_pretrained(name)
    except (OSError, ValueError) as error:
        where = "no such folder" if Path(name).expanduser().is_absolute() or name.startswith(".") else \
            "not in the local Hugging Face cache and the Hub could not be reached (offline?)"
        raise DreamBenchError(f"{what} model {name!r} could not be loaded: {where}. Give {option} a local folder "
                              f"(config.json and weights), or download it once with network access "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None


def _features(output) -> torch.Tensor:
    """transformers returns a tensor or (5.x) an output whose pooler_output is the projected embedding."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class Encoders:
    clip: object
    clip_processor: object
    dino: object | None
    dino_processor: object | None
    batch_size: int = 16

    @classmethod
    def load(cls, clip: str = DEFAULT_CLIP, dino: str | None = DEFAULT_DINO, batch_size: int = 16) -> "Encoders":
        from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

        clip_model = _pretrained(CLIPModel, clip, "CLIP", "--clip-model").eval()
        processor = _pretrained(CLIPProcessor, clip, "CLIP", "--clip-model")
        dino_model = dino_processor = None
        if dino:
            dino_model = _pretrained(ViTModel, dino, "DINO", "--dino-model").eval()
            dino_processor = _pretrained(AutoImageProcessor, dino, "DINO", "--dino-model")
        return cls(clip_model, processor, dino_model, dino_processor, batch_size)

    def _batched(self, items, encode) -> torch.Tensor:
        with torch.no_grad():
            out = torch.cat([encode(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)])
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def clip_images(self, images) -> torch.Tensor:
        return self._batched(images, lambda batch: _features(self.clip.get_image_features(
            pixel_values=self.clip_processor(images=batch, return_tensors="pt").pixel_values)))

    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        def encode(batch):
            tokens = self.clip_processor(text=batch, return_tensors="pt", padding=True, truncation=True)
            return _features(self.clip.get_text_features(input_ids=tokens.input_ids,
                                                         attention_mask=tokens.attention_mask))

        return self._batched(texts, encode)

    def dino_images(self, images) -> torch.Tensor:
        return self._batched(images, lambda batch: self.dino(
            pixel_values=self.dino_processor(images=batch, return_tensors="pt").pixel_values).last_hidden_state[:, 0])


# --------------------------------------------------------------------------------------------------
# The metrics


def image_similarity(generated: torch.Tensor, real: torch.Tensor, pairing: str = "all") -> torch.Tensor:
    """Per generated image: its mean cosine similarity to every real image ("all", DreamBooth) or to real image
    i mod n ("one", DreamBench++). Rows are unit vectors."""
    if pairing == "all":
        return (generated @ real.T).mean(dim=1)
    index = torch.arange(len(generated)) % len(real)
    return (generated * real[index]).sum(dim=1)


def text_similarity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Per image: cosine similarity with its own prompt."""
    return (images * texts).sum(dim=1)


@dataclass
class Inputs:
    files: list[Path]
    images: list
    prompts: list[str]
    reals: list


def read_inputs(images_dir, reference_dir=None, prompt: str | None = None) -> Inputs:
    """The generated images with their prompts and the real images; every problem found before a model loads."""
    files = image_files(Path(images_dir))
    reals = [load_image(p)[0] for p in image_files(Path(reference_dir))] if reference_dir else []
    loaded = [load_image(p) for p in files]
    prompts = [prompt if prompt else prompt_of(p, info) for p, (_, info) in zip(files, loaded)]
    missing = [p.name for p, text in zip(files, prompts) if not text]
    if missing:
        raise DreamBenchError(f"no prompt for {missing[0]} (and {len(missing) - 1} more): put it in "
                              f"{Path(missing[0]).stem}.txt beside the image, or give --prompt for all")
    return Inputs(files, [image for image, _ in loaded], prompts, reals)


def score_inputs(inputs: Inputs, encoders: Encoders, pairing: str = "all") -> dict:
    generated = encoders.clip_images(inputs.images)
    per_image = {"CLIP-T": text_similarity(generated, encoders.clip_texts(inputs.prompts))}
    if inputs.reals:
        per_image["CLIP-I"] = image_similarity(generated, encoders.clip_images(inputs.reals), pairing)
        if encoders.dino is not None:
            per_image["DINO"] = image_similarity(encoders.dino_images(inputs.images),
                                                 encoders.dino_images(inputs.reals), pairing)
    return {
        "images": len(inputs.files), "reference_images": len(inputs.reals), "pairing": pairing,
        "models": {"clip": getattr(encoders.clip, "name_or_path", None),
                   "dino": getattr(encoders.dino, "name_or_path", None)},
        "scores": {name: round(float(values.mean()), 6) for name, values in per_image.items()},
        "per_image": [{"file": p.name, "prompt": text, **{n: round(float(v[i]), 6) for n, v in per_image.items()}}
                      for i, (p, text) in enumerate(zip(inputs.files, inputs.prompts))],
    }


def evaluate_folder(images_dir, reference_dir=None, prompt: str | None = None, encoders: Encoders | None = None,
                    pairing: str = "all") -> dict:
    inputs = read_inputs(images_dir, reference_dir, prompt)
    return score_inputs(inputs, encoders or Encoders.load(), pairing)


def run_dreambench(options) -> int:
    """`para-trainer quality --images DIR [--reference DIR]` and `--dreambench-prompts FILE`."""
    try:
        if options.dreambench_prompts:
            if not options.class_noun:
                raise DreamBenchError("--dreambench-prompts needs --class-noun (the subject's class: dog, "
                                      "backpack, stuffed animal, …)")
            text = prompt_file(dreambench_prompts(options.identifier, options.class_noun, options.live),
                               options.images_per_prompt)
            path = Path(options.dreambench_prompts)
            temp = path.with_name(f".{path.name}.tmp")
            try:
                temp.write_text(text, encoding="utf-8")
                temp.replace(path)
            except OSError as error:
                raise DreamBenchError(f"cannot write {path}: {error.strerror or error}") from None
            print(f"written: {path} ({text.count(chr(10))} lines); sample them with: para-trainer sample --model "
                  f"BASE --network ADAPTER --prompts-file {path} --out DIR")
            return 0
        inputs = read_inputs(options.images, options.reference, options.prompt)
        encoders = Encoders.load(options.clip_model, None if options.dino_model == "none" else options.dino_model,
                                 options.batch_size)
        result = score_inputs(inputs, encoders, options.pairing)
    except DreamBenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{result['images']} images, {result['reference_images']} real images, pairing {result['pairing']}")
        for name, value in result["scores"].items():
            print(f"  {name:7s} {value:.4f}")
    return 0
