"""sd-webui-para: teaches the WebUI's built-in Lora extension the native PaRa file format.

A native PaRa file (written by para-trainer / networks.para) holds one `<module>.para_q` tensor (d_out, r) per
adapted layer: an orthonormal basis Q of the output directions the adapter removes, W = W0 - m·Q Qᵀ W0.
Merged files and PaRa + LoRA files hold a chain of stages per layer (`stageN.para_q`, `stageN.lora_up/down`,
`stageN.strength`, applied in order); they load the same way.
This script adds a `para` module type to the Lora extension's `networks.module_types`, so `<lora:NAME:m>`
loads such files like any other network.

Composition: by default the WebUI hands each network the layer's *running* weight (already including the
networks listed before it in the prompt), so several PaRa files apply one after another in prompt order:
W2 = (I - m2·P2)(I - m1·P1) W0. In the "old method" (lora_functional) setting they add up instead.

The PaRa math is not copied here: `para-trainer webui install` puts para-trainer's own networks/para.py (and
adapter_base.py) into lib/sd_webui_para_core/; without it, an installed para-trainer package is used.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys

logger = logging.getLogger("sd-webui-para")

EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_PACKAGE = "sd_webui_para_core"  # private name: the WebUI's own `networks` module hides para-trainer's


def _load_core_from(directory: str):
    """networks/para.py from `directory`, imported as CORE_PACKAGE.para (its relative imports need a package)."""
    if CORE_PACKAGE + ".para" in sys.modules:
        return sys.modules[CORE_PACKAGE + ".para"]
    spec = importlib.machinery.ModuleSpec(CORE_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [directory]
    sys.modules[CORE_PACKAGE] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(CORE_PACKAGE + ".para")
    except BaseException:
        sys.modules.pop(CORE_PACKAGE, None)
        raise


def _find_core_directory() -> str:
    shipped = os.path.join(EXTENSION_DIR, "lib", CORE_PACKAGE)
    if os.path.isfile(os.path.join(shipped, "para.py")):
        return shipped
    # para-trainer installed in the WebUI's Python: its networks/ folder sits beside para_trainer/.
    spec = importlib.util.find_spec("para_trainer")
    if spec is not None and spec.origin:
        installed = os.path.join(os.path.dirname(os.path.dirname(spec.origin)), "networks")
        if os.path.isfile(os.path.join(installed, "para.py")):
            return installed
    raise ImportError(
        f"sd-webui-para: the PaRa math is missing ({shipped}/para.py); install the extension with "
        "`para-trainer webui install PATH_TO_WEBUI` rather than copying the folder by hand")


_core = _load_core_from(_find_core_directory())
chain_delta_weight = _core.chain_delta_weight
stages_from_file = _core.stages_from_file
reorthonormalized = _core.reorthonormalized
Reduction = _core.Reduction
Q_KEY = _core.Q_KEY


def is_para_module(keys) -> bool:
    return any(key == Q_KEY or key.startswith("stage") for key in keys)


def _import_lora_extension():
    """The built-in Lora extension's `network` and `networks` modules (imported already when it ran first)."""
    if "networks" not in sys.modules or not hasattr(sys.modules["networks"], "module_types"):
        # metadata.ini orders this script after the Lora extension; if it did not run, find it next to us.
        lora_dir = os.path.join(os.path.dirname(os.path.dirname(EXTENSION_DIR)), "extensions-builtin", "Lora")
        if os.path.isdir(lora_dir) and lora_dir not in sys.path:
            sys.path.insert(0, lora_dir)
    import network  # the WebUI's modules (para-trainer's own `networks` package is not this one)
    import networks

    if not hasattr(networks, "module_types"):
        raise ImportError(f"`networks` is {getattr(networks, '__file__', networks)!r}, not the WebUI's built-in "
                          "Lora extension (it has no module_types)")
    return network, networks


network, networks = _import_lora_extension()


class ModuleTypePara(network.ModuleType):
    def create_module(self, net, weights):
        if is_para_module(weights.w):
            return NetworkModulePara(net, weights)
        return None


class NetworkModulePara(network.NetworkModule):
    """ΔW of the layer's chain (plain PaRa: -Q(QᵀW)) on the weight handed in; finalize_updown applies the
    multiplier (no alpha: dim stays None)."""

    def __init__(self, net, weights):
        super().__init__(net, weights)
        stages = stages_from_file(weights.w, f"sd-webui-para: {weights.network_key}")
        for stage in stages:
            if isinstance(stage, Reduction) and (stage.q.dim() != 2 or stage.q.shape[1] >= stage.q.shape[0]):
                raise ValueError(f"sd-webui-para: {weights.network_key} has Q of shape {tuple(stage.q.shape)}; "
                                 "a PaRa basis is (d_out, r) with r < d_out")
        self.stages = reorthonormalized(stages)  # fp16/bf16 files: QR makes each Q a projection again

    def calc_updown(self, orig_weight):
        out_features = orig_weight.shape[0]
        widths = {s.q.shape[0] if isinstance(s, Reduction) else s.up.shape[0] for s in self.stages}
        if widths != {out_features}:
            raise ValueError(f"sd-webui-para: {self.network_key} has factors for {sorted(widths)} outputs but the "
                             f"layer has {out_features}; the file was made for another model")
        w = orig_weight.float().reshape(out_features, -1)
        updown = chain_delta_weight(w, self.stages)  # the WebUI's multiplier comes in finalize_updown
        return self.finalize_updown(updown, orig_weight, orig_weight.shape)


def register() -> bool:
    """Add ModuleTypePara to networks.module_types once (networks survives UI reloads); True if added now."""
    if any(type(t).__name__ == "ModuleTypePara" for t in networks.module_types):
        return False
    networks.module_types.append(ModuleTypePara())
    logger.info("sd-webui-para: native PaRa files (%s keys) load through <lora:...>", Q_KEY)
    return True


register()

try:  # inside the WebUI: register again after a reload of the Lora extension's modules
    from modules import script_callbacks

    script_callbacks.on_before_ui(register)
except ImportError:
    pass
