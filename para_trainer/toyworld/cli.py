"""`para-trainer toyworld ...`: the toy world's commands.

    toyworld list                                   attributes, concepts and held-out pairs
    toyworld render OUT.png [--object ball --colour red --pattern striped --background beach
                             --position "top left" --size small --seed N]
    toyworld concept NAME OUT [--images 5] [--class-images 10]
                                                    a concept's DreamBooth training folder (train/5_sks toy,
                                                    reg/1_toy) in sd-scripts' layout, with .txt captions
    toyworld judge IMAGE... [--json]                what the judge sees in images
    toyworld evaluate [--model builtin:toy-sd1] [--samples N] [--out DIR] [--json]
                                                    how well a model draws the world, scored by the judge
    toyworld pretrain [--workdir DIR] [--stages ...] [--unet-steps N] ...
                                                    rebuild toy-sd1 from nothing (resumable)
    toyworld train-judge [--workdir DIR] [--steps N] rebuild the judge
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from .world import ATTRIBUTES, BACKGROUNDS, HELD_OUT_PAIRS, POSITIONS, SIZES, WorldError, check_value


def _list(options) -> int:
    from .concepts import CONCEPTS

    for attribute, values in ATTRIBUTES.items():
        print(f"{attribute}: {', '.join(values)}")
    print("concepts (held out; class noun 'toy'):")
    for concept in CONCEPTS.values():
        print(f"  {concept.name}: {concept.description} (default colour {concept.default_colour})")
    print("shape x background pairs held out of pretraining: "
          + ", ".join(f"{s} + {b}" for s, b in HELD_OUT_PAIRS))
    return 0


def _save_png(array, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def _render(options) -> int:
    from .concepts import CONCEPTS, concept_scene
    from .render import render
    from .world import SHAPES, scene_from_attributes

    rng = random.Random(options.seed)
    if options.object in CONCEPTS:
        scene = concept_scene(options.object, options.background or rng.choice(BACKGROUNDS),
                              options.position or rng.choice(POSITIONS), options.size or rng.choice(SIZES),
                              options.colour, variant=rng.randrange(1 << 30))
    else:
        shape = check_value("shape", options.object, extra=tuple(CONCEPTS)) if options.object else rng.choice(SHAPES)
        scene = scene_from_attributes(shape, rng, colour=options.colour, pattern=options.pattern,
                                      background=options.background, position=options.position, size=options.size)
    _save_png(render(scene), Path(options.out))
    print(f"wrote {options.out}: {json.dumps(scene.attributes())}")
    return 0


def _concept(options) -> int:
    from .files import write_concept_dataset

    written = write_concept_dataset(options.name, options.out, images=options.images,
                                    class_images=options.class_images, seed=options.seed)
    print(f"wrote {len(written)} files of {options.name} to {options.out} (train with --caption_extension .txt)")
    return 0


def _judge(options) -> int:
    from PIL import Image

    from .judge import load_judge

    missing = [p for p in options.images if not Path(p).is_file()]
    if missing:
        raise WorldError(f"image not found: {missing[0]}")
    images = [Image.open(p) for p in options.images]
    predicted = load_judge().predict(images)
    rows = [{head: values[i] for head, values in predicted.items()} for i in range(len(images))]
    if options.json:
        print(json.dumps(dict(zip(options.images, rows)), indent=2))
    else:
        for path, row in zip(options.images, rows):
            print(f"{path}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return 0


def _evaluate(options) -> int:
    from .evaluate import run_evaluate

    return run_evaluate(options)


def _pretrain(options) -> int:
    from .model import TOY_DIR
    from .pretrain import STAGES, Recipe, run

    stages = tuple(s.strip() for s in options.stages.split(",")) if options.stages else STAGES
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise WorldError(f"unknown stage {unknown[0]!r}; valid: {', '.join(STAGES)}")
    recipe_path = Path(options.workdir) / "recipe.json"
    recipe = Recipe.from_dict(json.loads(recipe_path.read_text())) if recipe_path.exists() else Recipe()
    for name in ("unet_steps", "layout_steps", "vae_crop_steps", "vae_full_steps", "images", "seed"):
        value = getattr(options, name)
        if value is not None:
            setattr(recipe, name, value)
    run(options.workdir, stages, out=Path(options.out or TOY_DIR), recipe=recipe, threads=options.threads)
    return 0


def _train_judge(options) -> int:
    from .judge import WEIGHTS, build

    vae = None
    if options.vae and options.vae != "none":
        from diffusers import AutoencoderKL

        from .model import TOY_DIR

        source = TOY_DIR / "vae" if options.vae == "toy-sd1" else Path(options.vae)
        vae = AutoencoderKL.from_pretrained(source).float().eval()
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    build(options.workdir, steps=options.steps, out=Path(options.out or WEIGHTS), vae=vae)
    return 0


def add_subcommand(commands) -> None:
    parser = commands.add_parser("toyworld", help="the toy world: renders, concepts, the judge, toy-sd1")
    sub = parser.add_subparsers(dest="toyworld_command", required=True)

    sub.add_parser("list", help="attributes, concepts and held-out pairs").set_defaults(run=_guarded(_list))

    render = sub.add_parser("render", help="render one scene to a PNG")
    render.add_argument("out")
    render.add_argument("--object", help="a shape (ball, box, ...) or a concept (smiley-ball, robot, ...)")
    for name in ("colour", "pattern", "background", "position", "size"):
        render.add_argument(f"--{name}")
    render.add_argument("--seed", type=int, default=0)
    render.set_defaults(run=_guarded(_render))

    concept = sub.add_parser("concept", help="a concept's training images in sd-scripts' DreamBooth layout")
    concept.add_argument("name")
    concept.add_argument("out")
    concept.add_argument("--images", type=int, default=5)
    concept.add_argument("--class-images", dest="class_images", type=int, default=10)
    concept.add_argument("--seed", type=int, default=0)
    concept.set_defaults(run=_guarded(_concept))

    judge = sub.add_parser("judge", help="what the judge sees in images")
    judge.add_argument("images", nargs="+")
    judge.add_argument("--json", action="store_true")
    judge.set_defaults(run=_guarded(_judge))

    evaluate = sub.add_parser("evaluate", help="how well a model draws the world, scored by the judge")
    evaluate.add_argument("--model", default="builtin:toy-sd1")
    evaluate.add_argument("--samples", type=int, default=240, help="prompts to sample (half seen, half held-out pairs)")
    evaluate.add_argument("--steps", type=int, default=30)
    evaluate.add_argument("--guidance", type=float, default=6.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", help="a folder for the grid and the results")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=_guarded(_evaluate))

    pretrain = sub.add_parser("pretrain", help="rebuild toy-sd1 from nothing (resumable)")
    pretrain.add_argument("--workdir", default="output/toyworld")
    pretrain.add_argument("--stages", help="comma-separated, of: data, vae, latents, unet, export (default all)")
    pretrain.add_argument("--out", help="where export writes the diffusers folder (default: the package's toy-sd1)")
    pretrain.add_argument("--unet-steps", dest="unet_steps", type=int)
    pretrain.add_argument("--layout-steps", dest="layout_steps", type=int,
                          help="steps of a last phase that names the position in every caption, at timesteps >= 500 "
                               "(default 1800, after the default 13000 --unet-steps: the shipped model's recipe)")
    pretrain.add_argument("--vae-crop-steps", dest="vae_crop_steps", type=int)
    pretrain.add_argument("--vae-full-steps", dest="vae_full_steps", type=int)
    pretrain.add_argument("--images", type=int)
    pretrain.add_argument("--seed", type=int)
    pretrain.add_argument("--threads", type=int)
    pretrain.set_defaults(run=_guarded(_pretrain))

    judge_train = sub.add_parser("train-judge", help="rebuild the judge (renders, training, accuracy)")
    judge_train.add_argument("--workdir", default="output/toyworld")
    judge_train.add_argument("--steps", type=int, default=2500)
    judge_train.add_argument("--out", help="default: the package's judge.safetensors")
    judge_train.add_argument("--vae", default="none",
                             help="train on round trips through this VAE too: toy-sd1, a diffusers VAE folder, or "
                                  "'none' (default; the shipped judge was trained so)")
    judge_train.add_argument("--threads", type=int)
    judge_train.set_defaults(run=_guarded(_train_judge))


def _guarded(command):
    """Bad names (attributes, concepts, stages) and models that do not load end in one line on stderr and exit
    status 2."""
    def run(options) -> int:
        from ..models.loading import ModelError

        try:
            return command(options)
        except (WorldError, ModelError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return run
