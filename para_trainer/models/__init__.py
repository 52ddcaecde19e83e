"""Base models: loading (diffusers folders, single files, the Hub, builtin:), single-file checkpoints, samplers,
the embedded tiny models and tokenizer, and per-architecture code (flux/)."""
