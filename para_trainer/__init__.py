"""para-trainer: PaRa (Parameter Rank Reduction) adapters for Stable Diffusion, sd-scripts compatible."""

__version__ = "0.1.0"
