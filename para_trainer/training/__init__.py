"""The trainer's stages: sd-scripts' arguments, data, optimizers, the training run, the bundled example data."""
