"""sd-scripts' --optimizer_type names (and any pkg.mod.Class), with --optimizer_args parsed as sd-scripts does."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

import torch


class OptimizerError(ValueError):
    """An optimizer that cannot be built from the arguments."""


class _OfflineQuietImport:
    """Runs a module's import with `kernels` hidden (no Hub access) and its loggers silenced."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import logging

        missing = object()
        hidden = sys.modules.get("kernels", missing)
        sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError: no Hub access
        log = logging.getLogger("bitsandbytes")
        level = log.level
        log.setLevel(logging.CRITICAL)
        try:
            self.loader.exec_module(module)
        finally:
            log.setLevel(level)
            if hidden is missing:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = hidden


class _BitsandbytesFinder:
    """A meta-path finder for the first import of bitsandbytes, by whoever imports it (diffusers does, whenever it
    is installed): that import runs offline and quietly (_OfflineQuietImport)."""

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineQuietImport(spec.loader)
        return spec


def keep_bitsandbytes_offline() -> None:
    """Make the first import of bitsandbytes offline and quiet, whenever and by whomever it happens.

    On CPUs with AVX512-BF16, importing bitsandbytes fetches a 4-bit matmul kernel from the Hugging Face Hub
    (kernels.get_kernel) and logs a WARNING about kernels-community and trust_remote_code when that fails. 8-bit
    optimizers never use that kernel. The commands call this at start; bitsandbytes itself is imported only when
    something needs it (an 8-bit optimizer, or diffusers loading a model).
    """
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _BitsandbytesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesFinder())


def _bitsandbytes(name: str):
    try:
        import bitsandbytes
    except ImportError:
        raise OptimizerError(f"--optimizer_type {name} needs bitsandbytes: pip install bitsandbytes") from None
    return getattr(bitsandbytes.optim, name)


def _lion():
    try:
        from lion_pytorch import Lion
    except ImportError:
        return _bitsandbytes("Lion")  # bitsandbytes ships a 32-bit Lion too
    return Lion


def _prodigy():
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise OptimizerError("--optimizer_type Prodigy needs prodigyopt: pip install prodigyopt") from None
    return Prodigy


# name (lower case) -> (how to get the class, extra keyword arguments sd-scripts adds)
OPTIMIZERS = {
    "adamw": (lambda: torch.optim.AdamW, {}),
    "adamw8bit": (lambda: _bitsandbytes("AdamW8bit"), {}),
    "pagedadamw": (lambda: _bitsandbytes("PagedAdamW"), {}),
    "pagedadamw8bit": (lambda: _bitsandbytes("PagedAdamW8bit"), {}),
    "pagedadamw32bit": (lambda: _bitsandbytes("PagedAdamW32bit"), {}),
    "lion": (_lion, {}),
    "lion8bit": (lambda: _bitsandbytes("Lion8bit"), {}),
    "pagedlion8bit": (lambda: _bitsandbytes("PagedLion8bit"), {}),
    "sgdnesterov": (lambda: torch.optim.SGD, {"nesterov": True, "momentum": 0.9}),
    "sgdnesterov8bit": (lambda: _bitsandbytes("SGD8bit"), {"nesterov": True, "momentum": 0.9}),
    "prodigy": (_prodigy, {}),
}


def parse_optimizer_args(items: list[str] | None) -> dict:
    """`key=value` strings; values through ast.literal_eval, else kept as strings (as sd-scripts)."""
    kwargs = {}
    for item in items or []:
        if "=" not in item:
            raise OptimizerError(f"--optimizer_args item {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return kwargs


def optimizer_name(args) -> str:
    if args.use_8bit_adam:
        return "AdamW8bit"
    if args.use_lion_optimizer:
        return "Lion"
    return args.optimizer_type or "AdamW"


def build_optimizer(args, param_groups, learning_rate: float):
    """(optimizer, description for ss_optimizer)."""
    name = optimizer_name(args)
    kwargs = parse_optimizer_args(args.optimizer_args)
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            optimizer_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise OptimizerError(f"--optimizer_type {name}: cannot import it ({error})") from None
    elif name.lower() in OPTIMIZERS:
        get_class, defaults = OPTIMIZERS[name.lower()]
        optimizer_class = get_class()
        kwargs = {**defaults, **kwargs}
    else:
        known = "AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, SGDNesterov, Prodigy"
        raise OptimizerError(f"unknown --optimizer_type {name!r}: use one of {known}, or a full class path such as "
                             "torch.optim.Adam")
    try:
        optimizer = optimizer_class(param_groups, lr=learning_rate, **kwargs)
    except (TypeError, ValueError) as error:
        words = [f"{key}={value}" for key, value in kwargs.items() if isinstance(value, str)]
        if words:  # a value that is not a Python literal stays a string, as in sd-scripts: the likely culprit
            raise OptimizerError(f"--optimizer_args {' '.join(words)}: {optimizer_class.__name__} refused "
                                 f"{'this value' if len(words) == 1 else 'these values'} ({error}); write a number "
                                 "(e.g. weight_decay=0.01), True/False or a tuple such as betas=(0.9,0.999)") from None
        raise OptimizerError(f"--optimizer_args do not fit {optimizer_class.__name__}: {error}") from None
    arguments = ",".join(f"{k}={v}" for k, v in kwargs.items())
    description = f"{optimizer_class.__module__}.{optimizer_class.__name__}" + (f"({arguments})" if arguments else "")
    return optimizer, description
