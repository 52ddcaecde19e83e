"""para-trainer: PaRa (Parameter Rank Reduction) adapters for Stable Diffusion, sd-scripts compatible.

models/     base models: loading (folders, single files, the Hub, builtin:), single-file checkpoints, samplers,
            the embedded tiny models and tokenizer, FLUX (models/flux/)
toyworld/   the toy world: renderer, held-out concepts, toy-sd1, the judge, pretraining
files/      adapter files: export, merge, inspect, metadata
training/   the trainer's stages
quality/    the quality study and the DreamBench evaluator
commands/   bench, sample, edit_study, and the WebUI extension and ComfyUI node installers
cli.py      the `para-trainer` command; hub.py: Hugging Face Hub push and pull; paths.py: file-path checks
The algorithms themselves live in networks/ (para.py, lora.py, krona.py over adapter_base.py).
"""

__version__ = "0.1.0"
