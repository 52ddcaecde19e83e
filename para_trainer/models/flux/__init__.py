"""FLUX.1 model code: the embedded tiny FLUX (`builtin:tiny-flux`), loading FLUX models, sd-scripts' FLUX files.

The flow-matching training step is a training stage: `para_trainer/training/flow_matching.py`.
"""

FLUX_PART_OPTIONS = ("ae", "clip_l", "t5xxl")


def add_flux_part_arguments(parser) -> None:
    """--ae/--clip_l/--t5xxl for commands whose --model may be sd-scripts' BFL FLUX transformer file."""
    for name, what in (("ae", "autoencoder"), ("clip_l", "CLIP-L"), ("t5xxl", "T5-XXL")):
        parser.add_argument(f"--{name}", help=f"with a BFL single-file FLUX transformer as --model: its {what} file, "
                                              "as sd-scripts' flux_train_network.py takes it")
