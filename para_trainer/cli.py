"""`para-trainer` (also `python -m para_trainer`): the project's commands.

    para-trainer train ARGS...          the trainer, same as train_para.py (sd-scripts' arguments)
    para-trainer tiny-model KIND OUT    write an embedded tiny model (sd1, sd2, sdxl) as a diffusers folder,
                                        or as a single-file checkpoint when OUT ends in .safetensors/.ckpt
    para-trainer example-data OUT       write the bundled example images in sd-scripts' DreamBooth layout
"""

from __future__ import annotations

import argparse
import sys


def _tiny_model(options) -> int:
    from .tiny_models import build_tiny_pipeline, save_tiny_pipeline

    if options.out.endswith((".safetensors", ".ckpt")):
        from .checkpoint import save_single_file

        save_single_file(build_tiny_pipeline(options.kind, seed=options.seed), options.out, kind=options.kind)
    else:
        save_tiny_pipeline(options.kind, options.out, seed=options.seed)
    print(f"wrote the tiny {options.kind} model to {options.out}")
    return 0


def _example_data(options) -> int:
    from .example_images import write_example_dataset

    write_example_dataset(options.out)
    print(f"wrote the example dataset to {options.out} (train/ and reg/ in sd-scripts' DreamBooth layout)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="para-trainer", description="PaRa adapters for Stable Diffusion.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train an adapter (sd-scripts' train_network.py arguments)", add_help=False)
    tiny = commands.add_parser("tiny-model", help="write an embedded tiny model (diffusers folder or single file)")
    tiny.add_argument("kind", choices=["sd1", "sd2", "sdxl"])
    tiny.add_argument("out", help="a folder, or a .safetensors/.ckpt path for a single-file checkpoint")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_model)
    example = commands.add_parser("example-data", help="write the bundled example images and captions")
    example.add_argument("out")
    example.set_defaults(run=_example_data)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .train import main as train_main

        sys.exit(train_main(argv[1:]))
    options = build_parser().parse_args(argv)
    sys.exit(options.run(options))
