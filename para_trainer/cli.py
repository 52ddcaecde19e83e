"""`para-trainer` (also `python -m para_trainer`): the project's commands.

    para-trainer train ARGS...          the trainer, same as train_para.py (sd-scripts' arguments)
    para-trainer tiny-model KIND OUT    write an embedded model (sd1, sd2, sdxl, flux: random tiny ones; toy-sd1) as a
                                        diffusers folder, or as a single-file checkpoint when OUT ends in
                                        .safetensors/.ckpt
    para-trainer example-data OUT       write the bundled example images in sd-scripts' DreamBooth layout
    para-trainer export FILE --model BASE -o OUT [--to lora|merged] [--rank N]
                                        an exact LoRA/LoCon file of a PaRa or KronA adapter, or adapters baked
                                        into the base model
    para-trainer merge A B [...] -o OUT [--model BASE] [--orthogonal]
                                        several adapters (PaRa, LoRA/LoCon, LoKr) as one native PaRa file,
                                        and with --model its exact LoRA export
    para-trainer sample --model BASE [--network FILE[:STRENGTH]]... --prompt TEXT --out DIR
                                        images with adapters applied, and a labelled contact sheet
    para-trainer inspect FILE [--json]  what an adapter or model file is: kind, base, ranks, metadata, hashes
    para-trainer webui install PATH     install the AUTOMATIC1111 extension for native PaRa files
    para-trainer comfyui install PATH   install the ComfyUI node package for native PaRa files (Load LoRA nodes)
    para-trainer bench [--ranks 4,32,128] [--methods ...] [--json] [--smoke]
                                        PaRa vs peft LoRA/PaRa, LyCORIS, sd-scripts LoRA, KronA: step time,
                                        memory, parameters, file size on one UNet (para_trainer/commands/bench.py)
    para-trainer push FILE_OR_DIR... USER/REPO [--revision R] [--private] [--message M]
                                        upload adapters, their LoRA export, samples and a model card in one commit
    para-trainer pull USER/REPO[@REV] [FILE ...] [-o DIR]
                                        download files of a Hub repository (through the Hugging Face cache)
    para-trainer toyworld ...           the toy world: renders, concepts, the judge, evaluating and pretraining
                                        builtin:toy-sd1 (para_trainer/toyworld/cli.py)
    para-trainer quality [--quick] [--sweep] [--report] [--out DIR] [--json]
                                        PaRa vs LoRA, LoCon, LoKr, KronA trained on the toy world's held-out
                                        concepts, scored by the judge (para_trainer/quality/)

Wherever a file is read (export, merge, sample, inspect, --network_weights), hf://USER/REPO[@REV]/PATH names a
file on the Hugging Face Hub (para_trainer/hub.py).
"""

from __future__ import annotations

import argparse
import os
import sys


def _refuse_path_under_file(path: str, what: str) -> bool:
    """Print one line and return True when `path` cannot be written because a part of it is a file."""
    from .paths import file_in_the_way

    folder = os.path.dirname(path) or "." if path.endswith((".safetensors", ".ckpt")) else path
    blocking = file_in_the_way(folder)
    if blocking:
        print(f"error: {what} {path}: {blocking} is a file, not a folder; choose another path", file=sys.stderr)
    return bool(blocking)


def _tiny_model(options) -> int:
    from .models.tiny import build_tiny_pipeline, save_tiny_pipeline

    if _refuse_path_under_file(options.out, "OUT"):
        return 2

    if options.kind == "flux":
        return _tiny_flux(options)
    if options.kind == "toy-sd1":
        from .toyworld.model import load_toy_pipeline

        pipe, kind = load_toy_pipeline(), "sd1"
    else:
        pipe, kind = build_tiny_pipeline(options.kind, seed=options.seed), options.kind
    if options.out.endswith((".safetensors", ".ckpt")):
        from .models.checkpoint import save_single_file

        save_single_file(pipe, options.out, kind=kind)
    elif options.kind == "toy-sd1":
        pipe.save_pretrained(options.out, safe_serialization=True)
    else:
        save_tiny_pipeline(options.kind, options.out, seed=options.seed)
    print(f"wrote the {'toy' if options.kind == 'toy-sd1' else 'tiny ' + options.kind} model to {options.out}")
    return 0


def _tiny_flux(options) -> int:
    """builtin:tiny-flux as a diffusers folder, or with --bfl as sd-scripts' four FLUX files in the folder."""
    from .models.flux.tiny import build_tiny_flux, save_tiny_flux

    if options.out.endswith((".safetensors", ".ckpt")):
        print("error: a FLUX model is several files: give a folder (with --bfl for sd-scripts' flux1, ae, clip_l and "
              "t5xxl .safetensors files)", file=sys.stderr)
        return 2
    if options.bfl:
        from .models.flux.bfl import save_bfl_files

        files = save_bfl_files(build_tiny_flux(seed=options.seed), options.out)
        print("wrote the tiny FLUX as sd-scripts' files: " + ", ".join(files.values()))
    else:
        save_tiny_flux(options.out, seed=options.seed)
        print(f"wrote the tiny FLUX model to {options.out}")
    return 0


def _example_data(options) -> int:
    from .training.example_images import write_example_dataset

    if _refuse_path_under_file(options.out, "OUT"):
        return 2

    write_example_dataset(options.out)
    print(f"wrote the example dataset to {options.out} (train/, reg/ and one_image/ in sd-scripts' DreamBooth layout)")
    return 0


def _export(options) -> int:
    from .files.export import run_export

    return run_export(options)


def _merge(options) -> int:
    from .files.merge import run_merge

    return run_merge(options)


def _inspect(options) -> int:
    from .files.inspect import run_inspect

    return run_inspect(options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="para-trainer", description="PaRa adapters for Stable Diffusion.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train an adapter (sd-scripts' train_network.py arguments)", add_help=False)
    tiny = commands.add_parser("tiny-model", help="write an embedded model (diffusers folder or single file)")
    tiny.add_argument("kind", choices=["sd1", "sd2", "sdxl", "flux", "toy-sd1"],
                      help="a random-weight tiny model, or toy-sd1 (pretrained on the toy world)")
    tiny.add_argument("--bfl", action="store_true",
                      help="flux: write sd-scripts' four FLUX files (flux1, ae, clip_l, t5xxl .safetensors) in OUT")
    tiny.add_argument("out", help="a folder, or a .safetensors/.ckpt path for a single-file checkpoint")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_model)
    example = commands.add_parser("example-data", help="write the bundled example images and captions")
    example.add_argument("out")
    example.set_defaults(run=_example_data)

    export = commands.add_parser("export", help="a native PaRa or KronA file as an exact LoRA/LoCon, or adapters "
                                                "merged into the base")
    export.add_argument("adapters", nargs="+", metavar="FILE",
                        help="native PaRa or KronA .safetensors; --to merged: also LoRA/LoCon/LoKr, several "
                             "(merged in this order)")
    export.add_argument("--model", help="the base model it was trained on: diffusers folder, .safetensors/.ckpt, "
                                        "Hub id or builtin:toy-sd1|tiny-sd1|tiny-sd2|tiny-sdxl|tiny-flux")
    export.add_argument("-o", "--out", required=True,
                        help="lora: a .safetensors file; merged: a .safetensors/.ckpt single file, or a folder (diffusers)")
    export.add_argument("--to", choices=["lora", "merged"], default="lora")
    export.add_argument("--precision", choices=["fp16", "fp32", "bf16"], default=None,
                        help="default: fp16 for lora, fp32 for merged; bf16 costs about 2e-3 relative error")
    export.add_argument("--multiplier", type=float, nargs="+", help="--to merged: strength per file (default 1)")
    export.add_argument("--rank", type=int, help="KronA/LoKr --to lora: truncate every module to this rank (the "
                                                 "error is printed); default exact, rank(A)·rank(B)")
    export.add_argument("--force", action="store_true", help="export although the file records another base model")
    export.add_argument("--v2", action="store_true", help="the base is an SD2 single-file checkpoint")
    export.add_argument("--v_parameterization", action="store_true")
    from .models.flux import add_flux_part_arguments

    add_flux_part_arguments(export)
    export.set_defaults(run=_export)

    merge = commands.add_parser("merge", help="several adapters as one native PaRa file (+ its exact LoRA export)")
    merge.add_argument("adapters", nargs="+", metavar="FILE[:STRENGTH]",
                       help="native PaRa, merged, LoRA/LoCon or LoKr files, applied in this order")
    merge.add_argument("-o", "--out", required=True, help="the merged native file (.safetensors); the LoRA export "
                                                          "goes beside it as NAME_lora.safetensors")
    merge.add_argument("--model", help="the base model: checks the files' base and writes the exact LoRA export")
    merge.add_argument("--orthogonal", action="store_true",
                       help="one projection onto the span of all Q's (order-free) instead of one after another")
    merge.add_argument("--no-export-lora", dest="no_export_lora", action="store_true")
    merge.add_argument("--precision", choices=["fp16", "fp32", "bf16"], default="fp16", help="of the LoRA export")
    merge.add_argument("--force", action="store_true", help="merge although a file records another base model")
    merge.add_argument("--v2", action="store_true", help="the base is an SD2 single-file checkpoint")
    add_flux_part_arguments(merge)
    merge.set_defaults(run=_merge)

    from .commands.sample import add_subcommand as add_sample_subcommand

    add_sample_subcommand(commands)

    inspect = commands.add_parser("inspect", help="what an adapter or model file is: kind, base, ranks, metadata")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="the whole report as JSON")
    inspect.add_argument("--no-hash", dest="no_hash", action="store_true", help="skip hashing (big checkpoints)")
    inspect.set_defaults(run=_inspect)

    from .commands.webui import add_subcommand as add_webui_subcommand

    add_webui_subcommand(commands)

    from .commands.comfyui import add_subcommand as add_comfyui_subcommand

    add_comfyui_subcommand(commands)

    from .commands.bench import add_subcommand as add_bench_subcommand

    add_bench_subcommand(commands)

    from .hub import add_subcommands as add_hub_subcommands

    add_hub_subcommands(commands)

    from .toyworld.cli import add_subcommand as add_toyworld_subcommand

    add_toyworld_subcommand(commands)

    from .quality.cli import add_subcommand as add_quality_subcommand

    add_quality_subcommand(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from .training.optimizers import keep_bitsandbytes_offline

    keep_bitsandbytes_offline()  # whoever imports bitsandbytes (diffusers does): no Hub access, no warning
    if argv[:1] == ["train"]:
        from .training.train import main as train_main

        sys.exit(train_main(argv[1:]))
    options = build_parser().parse_args(argv)
    sys.exit(options.run(options))
