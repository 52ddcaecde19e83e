"""`para-trainer comfyui install PATH`: put the ComfyUI-PaRa custom node package into a ComfyUI folder.

The package (comfyui_node/ComfyUI-PaRa) registers a `para` weight adapter with ComfyUI's comfy.weight_adapter, so
the standard "Load LoRA" nodes load native PaRa files. Its PaRa math is not a copy kept in this package:
installing copies networks/para.py and networks/adapter_base.py into the node's para_core/.
"""

from __future__ import annotations

from pathlib import Path

from .webui import InstallError, add_install_command, install_folder

NODE_NAME = "ComfyUI-PaRa"
CORE_PACKAGE = "para_core"  # must match the node's `from .para_core.para import ...`
WEIGHT_ADAPTER_MARKER = Path("comfy") / "weight_adapter" / "__init__.py"


def node_source() -> Path:
    return Path(__file__).resolve().parent / "comfyui_node" / NODE_NAME


def install_node(comfyui_dir, force: bool = False) -> Path:
    """Copy ComfyUI-PaRa into `<comfyui_dir>/custom_nodes/ComfyUI-PaRa` and return that path."""
    comfyui = Path(comfyui_dir).expanduser()
    if not (comfyui / "comfy").is_dir():
        raise InstallError(f"{comfyui} is not a ComfyUI folder: comfy/ is missing; pass ComfyUI's top folder (the "
                           "one with main.py, comfy/ and custom_nodes/)")
    if not (comfyui / WEIGHT_ADAPTER_MARKER).is_file():
        raise InstallError(f"{comfyui}: this ComfyUI has no {WEIGHT_ADAPTER_MARKER.parent.as_posix()}/ (it came in "
                           "2025); update ComfyUI, or use the NAME_lora.safetensors export with the Load LoRA node")
    return install_folder(comfyui / "custom_nodes", NODE_NAME, node_source(), CORE_PACKAGE, force,
                          "copied from networks/ by `para-trainer comfyui install`")


def add_subcommand(commands) -> None:
    """`comfyui install PATH [--force]` on the CLI's subparsers (argparse)."""
    add_install_command(commands, "comfyui", "ComfyUI custom node package", install_node,
                        "ComfyUI's top folder (holds comfy/ and custom_nodes/)",
                        f"installed {NODE_NAME} into {{target}}; restart ComfyUI, then load native PaRa files with "
                        "the Load LoRA node, as any LoRA")
