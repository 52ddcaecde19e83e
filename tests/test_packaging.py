"""pyproject.toml ships every package and data file of para_trainer/: a wheel or a non-editable install has what
the checkout has (para_trainer.flux was once missing from the list, so FLUX failed to import outside a checkout)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def tracked(pattern: str) -> set[Path]:
    return {p for p in (ROOT / "para_trainer").glob(pattern) if "__pycache__" not in p.parts and p.is_file()}


def test_every_package_is_listed():
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in tracked("**/__init__.py")}
    packages -= {name for name in packages if "comfyui_node" in name or "webui_extension" in name}  # shipped as data
    assert packages <= set(SETUPTOOLS["packages"]), sorted(packages - set(SETUPTOOLS["packages"]))
    assert "networks" in SETUPTOOLS["packages"]
    assert all((ROOT / name.replace(".", "/")).is_dir() for name in SETUPTOOLS["packages"])


def test_every_data_file_is_package_data():
    package_dirs = {ROOT / name.replace(".", "/") for name in SETUPTOOLS["packages"]}
    data = {p for p in tracked("**/*") if not (p.suffix == ".py" and p.parent in package_dirs)}
    covered = set().union(*(tracked(pattern) for pattern in SETUPTOOLS["package-data"]["para_trainer"]))
    missing = sorted(str(p.relative_to(ROOT)) for p in data - covered)
    assert not missing, missing
    assert all(tracked(pattern) for pattern in SETUPTOOLS["package-data"]["para_trainer"])  # no stale pattern
