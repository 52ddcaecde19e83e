"""`para-trainer quality`: train every method on the toy world's held-out concepts and let the judge score them.

    para-trainer quality --quick                     one concept, PaRa and LoRA at one budget, one seed
    para-trainer quality                             every concept x method x budget x 3 seeds (hours)
    para-trainer quality --sweep                     the learning-rate sweep (x0.3, x1, x3) on one concept
    para-trainer quality --single-image --methods para-exca lora --ks 1 --seeds 1
                                                     single-image editing: identity kept, edit applied, the
                                                     same result across noise seeds
    para-trainer quality --multi-subject             two subjects trained apart, then merged (PaRa) or added
                                                     (LoRA): is each still recognised?
    para-trainer quality --report                    only rebuild the table and plots from finished cells

For real models, DreamBench's metrics (DINO, CLIP-I, CLIP-T; quality/dreambench.py):
    para-trainer quality --dreambench-prompts prompts.txt --class-noun dog --live
                                                     DreamBooth's 25 prompts x 4 seeds as a prompt file
    para-trainer sample --model BASE --network ADAPTER --prompts-file prompts.txt --out generated
    para-trainer quality --images generated --reference data/dog
                                                     the three scores (CLIP and DINO through transformers)

Finished cells are kept in <out>/cells/ and never run twice: run the same command again to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .methods import KS, METHODS, NOT_RUN, Variant, budget_variants

QUICK = {"concepts": ["robot"], "variants": [Variant("para", 2), Variant("lora", 1)], "seeds": [0]}
SWEEP_FACTORS = (0.3, 1.0, 3.0)


def plan(options) -> list:
    from ..toyworld.concepts import CONCEPTS
    from .study import Cell

    if options.quick:
        concepts, variants, seeds = QUICK["concepts"], QUICK["variants"], QUICK["seeds"]
    else:
        concepts = options.concepts or list(CONCEPTS)
        seeds = list(range(options.seeds))
        if options.sweep:
            concepts, seeds = concepts[:1], seeds[:1]
            variants = [Variant(m, 0 if not METHODS[m].ranked else (2 if METHODS[m].module == "networks.para" else 1),
                                f) for m in options.methods for f in SWEEP_FACTORS]
        else:
            variants = [dataclasses.replace(v, lr_factor=f) for v in budget_variants(options.methods, tuple(options.ks))
                        for f in options.lr_factors]
    task = "single-image" if options.single_image else "subject"
    return [Cell(c, v, s, task) for s in seeds for c in concepts for v in variants]


def check(options) -> None:
    from ..toyworld.concepts import get_concept

    for name in (options.concepts or []) + ([options.grid] if options.grid else []):
        get_concept(name)
    unknown = [m for m in options.methods if m not in METHODS]
    if unknown:
        why = NOT_RUN.get(unknown[0])
        raise ValueError(f"--methods {unknown[0]}: " + (why if why else f"unknown; valid: {', '.join(METHODS)}"))
    if options.multi_subject and options.concepts and len(options.concepts) != 2:
        raise ValueError("--multi-subject takes two --concepts (default: robot duck)")
    if options.seeds < 1 or options.steps < 2 or any(k < 1 for k in options.ks) or \
            any(f <= 0 for f in options.lr_factors):
        raise ValueError("--seeds, --ks and --lr-factors take positive numbers, --steps at least 2")


def run_quality(options) -> int:
    if options.images or options.dreambench_prompts:
        from .dreambench import run_dreambench

        return run_dreambench(options)
    from ..toyworld.world import WorldError
    from .report import write_report
    from .study import Settings, Study

    try:
        check(options)
    except (ValueError, WorldError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(options.out)
    study = Study(out, Settings(steps=options.steps), log=lambda m: print(m, file=sys.stderr))
    try:
        out.mkdir(parents=True, exist_ok=True)
        if options.multi_subject:
            from .multi_subject import PAIR, run_multi_subject

            print(run_multi_subject(study, options.concepts or PAIR))
            print(f"written: {out / 'multi-subject'}")
            return 0
        if not options.report:
            study.run(plan(options), progress=not options.json)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished cells are in {out / 'cells'}; run the same command to go on",
              file=sys.stderr)
        return 130
    except OSError as error:
        print(f"error: cannot write the study's results under {out}: {error}", file=sys.stderr)
        return 2
    if options.grid:  # the same Study: the model and judge it loaded for the cells serve the grid
        cells = [c for c in plan(options) if c.concept == options.grid and c.seed == 0 and study.cell_path(c).exists()]
        path = study.grid(options.grid, cells, out / f"samples-{options.grid}.png")
        print(f"samples: {path} (rows: base model, " + ", ".join(c.variant.key for c in cells) + ")")
    summary = write_report(out)
    if options.json:
        print(json.dumps(summary, indent=1))
    else:
        print((out / "results.md").read_text())
        print(f"written: {out / 'results.json'}, {out / 'results.md'}, plots in {out}")
    return 0


def add_subcommand(commands) -> None:
    parser = commands.add_parser("quality", help="PaRa against LoRA, LoCon, LoKr and KronA on the toy world, "
                                 "scored by the judge (fidelity, alignment, drift, diversity)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/quality", help="results folder (default output/quality)")
    parser.add_argument("--quick", action="store_true", help="one concept, PaRa r=2 and LoRA r=1, one seed")
    parser.add_argument("--sweep", action="store_true", help="learning rates x0.3, x1, x3 on the first concept")
    parser.add_argument("--single-image", dest="single_image", action="store_true",
                        help="single-image editing: train on one photo, edit it by prompt over 4 noise seeds")
    parser.add_argument("--multi-subject", dest="multi_subject", action="store_true",
                        help="two subjects trained apart ('sks', 'dog'), then merged (PaRa) or added (LoRA): is "
                             "each still recognised? (quality/multi_subject.py)")
    parser.add_argument("--report", action="store_true", help="only the table and plots from finished cells")
    parser.add_argument("--concepts", nargs="+", help="held-out concepts (default: all)")
    default_methods = [name for name, method in METHODS.items() if method.in_default_study]
    parser.add_argument("--methods", nargs="+", default=default_methods,
                        help=f"default: {' '.join(default_methods)}; also: "
                             f"{' '.join(name for name in METHODS if name not in default_methods)}")
    parser.add_argument("--ks", nargs="+", type=int, default=list(KS),
                        help="budgets: PaRa r=k and 2k against the others at r=k (default 1 2)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per cell (default 3)")
    parser.add_argument("--lr-factors", dest="lr_factors", nargs="+", type=float, default=[1.0],
                        help="each method's learning rate times these (default 1)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per cell (default 200)")
    parser.add_argument("--grid", metavar="CONCEPT", help="also draw <out>/samples-CONCEPT.png: the prompt set "
                        "(columns) for the base model and each finished variant of the plan at seed 0 (rows)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_dreambench_arguments(parser.add_argument_group("DreamBench metrics for real models (quality/dreambench.py)"))
    parser.set_defaults(run=run_quality)


def add_dreambench_arguments(group) -> None:
    from .dreambench import DEFAULT_CLIP, DEFAULT_DINO

    group.add_argument("--images", metavar="DIR", help="score a folder of generated images (prompts from IMAGE.txt "
                       "or the PNG's A1111 parameters) instead of running the toy-world study")
    group.add_argument("--reference", metavar="DIR", help="the subject's real images (for DINO and CLIP-I)")
    group.add_argument("--prompt", help="the prompt of every image in --images")
    group.add_argument("--clip-model", dest="clip_model", default=DEFAULT_CLIP,
                       help=f"CLIP for CLIP-I and CLIP-T: Hub id or folder (default {DEFAULT_CLIP})")
    group.add_argument("--dino-model", dest="dino_model", default=DEFAULT_DINO,
                       help=f"DINO ViT for DINO: Hub id, folder or none (default {DEFAULT_DINO})")
    group.add_argument("--pairing", choices=("all", "one"), default="all",
                       help="all: every generated image against every real one (DreamBooth, default); one: image i "
                            "against real image i (DreamBench++)")
    group.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    group.add_argument("--dreambench-prompts", dest="dreambench_prompts", metavar="FILE",
                       help="write DreamBooth's 25 prompts for a subject as a prompt file and stop")
    group.add_argument("--identifier", default="sks", help="the subject's token in the prompts (default sks)")
    group.add_argument("--class-noun", dest="class_noun", help="the subject's class (dog, backpack, stuffed animal…)")
    group.add_argument("--live", action="store_true", help="a live subject (cats, dogs): outfit prompts")
    group.add_argument("--images-per-prompt", dest="images_per_prompt", type=int, default=4,
                       help="seeds per prompt in the prompt file (default 4, as DreamBooth)")
