"""FLUX.1: the embedded tiny FLUX (`builtin:tiny-flux`) and the FLUX-specific model code."""
