"""What the judge says about a training run on toy-sd1: did the samples become the subject?

At the end of a run whose base is toy-sd1 and whose sample prompts were drawn before and after training, the
trainer prints, per kind of prompt, before -> after: the judge's identity score (mean cosine similarity of the
samples' embeddings to the training images' embeddings, the DINO score of the papers) and how many samples the
judge's object head calls the subject (the object it names in most of the training images):

    prompts with the identifier ("a photo of sks toy on the beach")   should rise: the subject is learned
    prompts without it ("a photo of a toy")                            should stay: the class is kept
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .model import UNET_CONFIG


def is_toy_model(unet) -> bool:
    """Whether a UNet has toy-sd1's architecture (whatever file or folder it came from)."""
    config = unet.config
    return (list(getattr(config, "block_out_channels", [])) == UNET_CONFIG["block_out_channels"]
            and list(config.block_out_channels) == UNET_CONFIG["block_out_channels"]
            and config.cross_attention_dim == UNET_CONFIG["cross_attention_dim"]
            and config.sample_size == UNET_CONFIG["sample_size"])


def identifier_of(class_tokens: str) -> str | None:
    """sd-scripts' folder convention "N_identifier class": the identifier is the first word ("sks" of "sks toy")."""
    words = class_tokens.split()
    return words[0] if len(words) >= 2 else None


@dataclass(frozen=True)
class KindScores:
    """One kind of prompt (with or without the identifier): identity score and samples called the subject."""
    before: float
    after: float
    count: int
    recognised_before: int
    recognised_after: int


def identity_scores(before: list[Path], after: list[Path], prompts: list[str], subject_images: list[str],
                    identifier: str) -> dict[str, KindScores]:
    """{"with identifier" / "without": the scores of the samples of those prompts}."""
    from PIL import Image

    from .judge import load_judge

    judge = load_judge()

    def load(paths):
        return [Image.open(p).convert("RGB") for p in paths]

    subject = load(subject_images)
    references = judge.embed(subject)
    subject_object = Counter(judge.predict(subject)["object"]).most_common(1)[0][0]
    scores = {}
    for label, keep in (("with identifier", True), ("without", False)):
        chosen = [i for i, text in enumerate(prompts) if (identifier in text.split()) == keep]
        if not chosen:
            continue
        similarity, recognised = [], []
        for paths in (before, after):
            images = load([paths[i] for i in chosen])
            similarity.append(float((judge.embed(images) @ references.T).mean()))
            recognised.append(sum(name == subject_object for name in judge.predict(images)["object"]))
        scores[label] = KindScores(similarity[0], similarity[1], len(chosen), recognised[0], recognised[1])
    return scores


def format_scores(scores: dict[str, KindScores], identifier: str) -> str:
    lines = ["judge (toy world): the samples against the training images, before -> after",
             f"  {'':28s} {'identity score':16s} called the subject"]
    for label, s in scores.items():
        what = f"prompts with '{identifier}'" if label == "with identifier" else f"prompts without '{identifier}'"
        what = f"{what} ({s.count})"
        lines.append(f"  {what:28s} {s.before:5.2f} -> {s.after:5.2f}   "
                     f"{s.recognised_before}/{s.count} -> {s.recognised_after}/{s.count}")
    return "\n".join(lines)


def sample_sheet(sample_dir: Path, name: str | None, prompts: list[str], subject_images: list[str]):
    """The run's samples as one labelled grid: a row per sampling step (the base model's first), a column per
    prompt, and a last row with (some of) the training images (the README's quick-start picture)."""
    from PIL import Image

    from ..models.sampling import contact_sheet, parse_sample_name

    rows: dict[str, dict[int, Path]] = {}
    for path in sorted(Path(sample_dir).iterdir()):
        parsed = parse_sample_name(path.name)
        if parsed and parsed[0] == (f"{name}_" if name else ""):
            rows.setdefault(parsed[1], {})[parsed[2]] = path
    tags = sorted(rows, key=lambda tag: (tag.startswith("e"), int(tag.lstrip("e"))))
    images = [[Image.open(rows[tag][i]).convert("RGB") if i in rows[tag] else Image.new("RGB", (1, 1), "white")
               for i in range(len(prompts))] for tag in tags]
    labels = ["base model (before)" if int(tag.lstrip("e")) == 0 else
              (f"epoch {int(tag[1:])}" if tag.startswith("e") else f"step {int(tag)}") for tag in tags]
    images.append([Image.open(p).convert("RGB") for p in subject_images])
    labels.append("training images")
    scale = max(1, 128 // max(image.width for row in images for image in row))  # toy-sd1's 64 px shown at 128
    images = [[image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in row]
              for row in images]
    return contact_sheet(images, labels, prompts + [""] * max(0, len(subject_images) - len(prompts)))
