"""`para-trainer webui install PATH`: put the sd-webui-para extension into an AUTOMATIC1111 WebUI.

The extension (webui_extension/sd-webui-para) adds a native `para` module type to the WebUI's built-in Lora
extension. Its PaRa math is not a copy kept in this package: installing copies networks/para.py and
networks/adapter_base.py into the extension's lib/sd_webui_para_core/, so the WebUI needs no para-trainer.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from .. import __version__

EXTENSION_NAME = "sd-webui-para"
CORE_PACKAGE = "sd_webui_para_core"  # must match scripts/para_network.py
CORE_FILES = ("para.py", "adapter_base.py")
LORA_MARKER = Path("extensions-builtin") / "Lora" / "networks.py"


class InstallError(ValueError):
    """The folder is not a front end this plugin fits, or an install would overwrite something."""



def extension_source() -> Path:
    return Path(__file__).resolve().parent / "webui_extension" / EXTENSION_NAME


def core_source() -> Path:
    """The networks/ folder para.py is imported from (this checkout or the installed package)."""
    from networks import para

    return Path(para.__file__).resolve().parent


def _stage(directory: Path, source: Path, core_package: Path, note: str) -> None:
    """Write the complete plugin into `directory` (which must not exist yet): `source`, with para-trainer's PaRa
    math (networks/para.py, adapter_base.py) copied into `core_package` (a path relative to `directory`)."""
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    core = directory / core_package
    core.mkdir(parents=True)
    networks = core_source()
    for name in CORE_FILES:
        shutil.copy2(networks / name, core / name)
    (core / "__init__.py").write_text(f'"""PaRa math of para-trainer {__version__}: {note}; do not edit: reinstall '
                                      'instead."""\n', encoding="utf-8")


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def install_folder(parent: Path, name: str, source: Path, core_package, force: bool, note: str) -> Path:
    """Copy the plugin `source` into `parent/name` (with the PaRa math in `core_package`) and return that path.

    The new folder is built beside the target and renamed into place, so the front end never sees half an
    install. An identical install is left alone; a different one (another version, local edits) needs force.
    """
    target = parent / name
    if target.exists() and not target.is_dir():
        raise InstallError(f"{target} exists and is not a folder; move it away and run the install again")
    parent.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-new-", dir=parent))
    old = None
    try:
        _stage(staging / name, source, Path(core_package), note)
        new = staging / name
        if target.exists():
            if _tree(target) == _tree(new):
                return target
            if not force:
                raise InstallError(
                    f"{target} already holds a different {name} (another version or local edits); "
                    "pass --force to replace it")
            old = staging / "old"
            target.rename(old)
        try:
            new.rename(target)
        except OSError:
            if old is not None:
                old.rename(target)  # put the previous install back
            raise
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_extension(webui_dir, force: bool = False) -> Path:
    """Copy sd-webui-para into `<webui_dir>/extensions/sd-webui-para` and return that path (install_folder)."""
    webui = Path(webui_dir).expanduser()
    if not (webui / LORA_MARKER).is_file():
        raise InstallError(
            f"{webui} is not an AUTOMATIC1111/Forge-with-A1111-Lora WebUI folder: {LORA_MARKER.as_posix()} is "
            "missing; pass the WebUI's top folder (the one with webui.py and extensions-builtin/)")
    return install_folder(webui / "extensions", EXTENSION_NAME, extension_source(), Path("lib") / CORE_PACKAGE,
                          force, "copied from networks/ by `para-trainer webui install`")


def add_install_command(commands, command: str, what: str, install, folder_help: str, done: str) -> None:
    """`COMMAND install PATH [--force]` on the CLI's subparsers: `install(path, force)` returns the installed
    folder; an InstallError is one line and exit status 2; `done` (with {target}) is printed after."""

    def run(options) -> int:
        try:
            target = install(options.folder, force=options.force)
        except InstallError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(done.format(target=target))
        return 0

    parser = commands.add_parser(command, help=f"the {what} for native PaRa files")
    actions = parser.add_subparsers(dest=f"{command}_command", required=True)
    install_parser = actions.add_parser("install", help=f"install the {what} into a folder")
    install_parser.add_argument("folder", metavar="PATH", help=folder_help)
    install_parser.add_argument("--force", action="store_true", help="replace a different existing install")
    install_parser.set_defaults(run=run)


def add_subcommand(commands) -> None:
    """`webui install PATH [--force]` on the CLI's subparsers (argparse)."""
    add_install_command(commands, "webui", "AUTOMATIC1111 WebUI extension", install_extension,
                        "the WebUI's top folder (holds extensions-builtin/)",
                        f"installed {EXTENSION_NAME} into {{target}}; restart the WebUI, then use native PaRa files "
                        "as <lora:NAME:multiplier>")
