"""`para-trainer sample`: images from a base model with adapters applied, and a labelled contact sheet.

Rows of the sheet are adapter settings, columns are prompt × seed:
  * by default one row: every --network applied, in the given order (as `merge` would combine them);
  * --compare: a row for the base model and one per --network, each alone;
  * --strengths 0 0.5 1: the rows above repeated at each global strength (it multiplies every file's strength).
Adapters are baked into the weights (float32 math) and the original weights are put back between rows, so a
row at strength 0 is the base model bit for bit.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from networks.adapter_base import AdapterFileError

from ..files.adapter_files import AdapterFile, adapters_applied, layer_chains, parse_file_and_strength, read_adapter
from ..models.flux import add_flux_part_arguments
from ..paths import file_in_the_way
from ..models.sampling import (SHEET_NAME, SamplePrompt, SamplingError, contact_sheet, generate_image, read_prompt_file,
                       save_png)



def adapter_rows(networks: list[tuple[AdapterFile, float]], compare: bool, strengths: list[float] | None):
    """[(label, [(adapter, strength), ...])]: the adapter settings of the sheet's rows, top to bottom."""
    if compare:
        base_rows = [("base", [])] + [(_label([item]), [item]) for item in networks]
    else:
        base_rows = [(_label(networks) if networks else "base", networks)]
    if not strengths:
        return base_rows
    rows = []
    for strength in strengths:
        for label, items in base_rows:
            if items:
                rows.append((f"{label} @x{strength:g}", [(a, s * strength) for a, s in items]))
            elif strength == strengths[0]:
                rows.append((label, items))
    return rows


def _label(items) -> str:
    return " + ".join(f"{Path(adapter.path).stem}:{strength:g}" for adapter, strength in items)


def prompt_columns(prompts: list[SamplePrompt], seed: int, seeds: int) -> list[SamplePrompt]:
    """Each prompt once per seed (seed, seed+1, ...); a prompt that sets its own seed (--d) keeps it."""
    columns = []
    for prompt in prompts:
        if prompt.seed is not None:
            columns.append(prompt)
        else:
            columns += [replace(prompt, seed=seed + i) for i in range(seeds)]
    return columns


def sample(models, networks: list[tuple[AdapterFile, float]], prompts: list[SamplePrompt], out_dir, *,
           compare: bool = False, strengths: list[float] | None = None, seed: int = 0, seeds: int = 1,
           sampler: str = "ddim", size: tuple[int, int] | None = None, clip_skip: int | None = None,
           device=None) -> dict:
    """Generate every row × column, save the images and the sheet; returns the files and labels."""
    out_dir = Path(out_dir)
    rows = adapter_rows(networks, compare, strengths)
    columns = prompt_columns(prompts, seed, seeds)
    for adapter, strength in networks:  # every file fits the model before an image is made
        layer_chains(adapter, models, strength)
    out_dir.mkdir(parents=True, exist_ok=True)
    if size is None:
        side = models.vae.config.sample_size if models.kind == "flux" else \
            models.unet.config.sample_size * 2 ** (len(models.vae.config.block_out_channels) - 1)
        size = (side, side)
    prediction_type = "v_prediction" if models.v_parameterization else None

    images, files = [], []
    for row, (label, items) in enumerate(rows):
        row_images = []
        with adapters_applied(models, items):
            for column, prompt in enumerate(columns):
                image = generate_image(models.pipeline, prompt, sampler, size, device, clip_skip=clip_skip,
                                       prediction_type=prediction_type)
                image.info["parameters"] += f"\nAdapters: {label}"
                path = out_dir / f"{row:02d}_{column:02d}_seed{prompt.seed}.png"
                save_png(image, path)
                row_images.append(image)
                files.append(str(path))
        images.append(row_images)
    column_labels = [f"{p.prompt} (seed {p.seed})" for p in columns]
    sheet_path = out_dir / SHEET_NAME
    save_png(contact_sheet(images, [label for label, _ in rows], column_labels), sheet_path)
    return {"images": files, "sheet": str(sheet_path), "rows": [label for label, _ in rows],
            "columns": column_labels}


def check_folder_path(path: str, option: str) -> None:
    """SamplingError when a folder cannot be made at `path` because a part of it is a file."""
    blocking = file_in_the_way(path)
    if blocking:
        raise SamplingError(f"{option} {path}: {blocking} is a file, not a folder; choose another path")


def check_device(device: str | None) -> None:
    import torch

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise SamplingError(f"--device {device}: no CUDA GPU is available here (this PyTorch "
                            f"{'has no CUDA support' if torch.version.cuda is None else 'finds no GPU'}); leave "
                            "--device out to sample on the CPU")


def run_sample(options) -> int:
    """`para-trainer sample` (options from cli.py); errors are printed as one line, exit status 2."""
    from ..models.checkpoint import CheckpointError
    from ..files.export import load_base_model
    from ..hub import HubError, resolve_path
    from ..models.loading import ModelError

    try:
        if bool(options.prompt) == bool(options.prompts_file):
            raise SamplingError("give the prompts with --prompt TEXT (repeatable) or --prompts-file FILE, one of them")
        if options.seeds < 1:
            raise SamplingError(f"--seeds {options.seeds}: give at least 1")
        if options.steps < 1:
            raise SamplingError(f"--steps {options.steps}: sample with at least 1 step (e.g. --steps 30)")
        if os.path.exists(options.out) and not os.path.isdir(options.out):
            raise SamplingError(f"--out {options.out} is a file; --out names a folder for the images and "
                                f"{SHEET_NAME}")
        check_folder_path(options.out, "--out")
        check_device(options.device)
        prompts = (read_prompt_file(options.prompts_file) if options.prompts_file else
                   [SamplePrompt(text, negative_prompt=options.negative_prompt or "") for text in options.prompt])
        prompts = [replace(p, steps=p.steps if p.steps is not None else options.steps,
                           scale=p.scale if p.scale is not None else options.scale) for p in prompts]
        networks = [(read_adapter(resolve_path(path)), strength)
                    for path, strength in map(parse_file_and_strength, options.network or [])]
        if options.compare and not networks:
            raise SamplingError("--compare puts each --network beside the base model: give at least one --network")
        models = load_base_model(options.model, v2=options.v2, options=options)
        size = (options.width, options.height) if options.width or options.height else None
        if size is not None and not (options.width and options.height):
            raise SamplingError("give both --width and --height (or neither, for the model's own size)")
        report = sample(models, networks, prompts, options.out, compare=options.compare, strengths=options.strengths,
                        seed=options.seed, seeds=options.seeds, sampler=options.sampler, size=size,
                        clip_skip=options.clip_skip, device=options.device)
    except (SamplingError, AdapterFileError, ModelError, CheckpointError, HubError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(report['images'])} images and the contact sheet {report['sheet']}")
    print(f"  rows: {' | '.join(report['rows'])}")
    return 0


def add_subcommand(commands) -> None:
    from ..models.sampling import SAMPLERS

    sample_parser = commands.add_parser("sample", help="images with adapters applied, and a contact sheet")
    sample_parser.add_argument("--model", required=True, help="the base model: diffusers folder, .safetensors/.ckpt, "
                                                              "Hub id or builtin:toy-sd1|tiny-sd1|tiny-sd2|tiny-sdxl|tiny-flux")
    sample_parser.add_argument("--network", action="append", metavar="FILE[:STRENGTH]",
                               help="an adapter (native PaRa, merged, LoRA/LoCon, LoKr); repeat for several, "
                                    "applied in order")
    sample_parser.add_argument("--compare", action="store_true",
                               help="one row per --network alone, beside a base-model row")
    sample_parser.add_argument("--strengths", type=float, nargs="+", metavar="S",
                               help="repeat the rows at these global strengths (0 = the base model)")
    sample_parser.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    sample_parser.add_argument("--prompts-file", dest="prompts_file",
                               help="sd-scripts' prompt file (.txt with --n/--d/--s/--l/--w/--h/--ss, .toml, .json)")
    sample_parser.add_argument("--negative-prompt", dest="negative_prompt", help="for --prompt")
    sample_parser.add_argument("--seed", type=int, default=0, help="seed of prompts without their own --d")
    sample_parser.add_argument("--seeds", type=int, default=1, help="images per prompt: seeds SEED, SEED+1, ...")
    sample_parser.add_argument("--steps", type=int, default=30)
    sample_parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    sample_parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    sample_parser.add_argument("--width", type=int, help="default: the model's own resolution")
    sample_parser.add_argument("--height", type=int)
    sample_parser.add_argument("--clip_skip", type=int)
    sample_parser.add_argument("--v2", action="store_true", help="the model is an SD2 single-file checkpoint")
    add_flux_part_arguments(sample_parser)
    sample_parser.add_argument("--device", help="default: the model's device (cpu); e.g. cuda")
    sample_parser.add_argument("--out", required=True, help="folder for the images and contact_sheet.png")
    sample_parser.set_defaults(run=run_sample)
