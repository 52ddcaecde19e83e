"""networks/ works beside sd-scripts: installed as a namespace package, or copied into its networks/ folder."""

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROP_IN_FILES = ("para.py", "adapter_base.py")


def test_networks_is_a_plain_folder_like_sd_scripts():
    assert not os.path.exists(os.path.join(ROOT, "networks", "__init__.py"))


@pytest.mark.parametrize("name", DROP_IN_FILES)
def test_drop_in_files_need_only_torch_safetensors_and_the_standard_library(name):
    tree = ast.parse(open(os.path.join(ROOT, "networks", name), encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert node.module in {f[:-3] for f in DROP_IN_FILES}, f"{name} imports .{node.module}"
    assert imported - set(sys.stdlib_module_names) <= {"torch", "safetensors"}, imported


def fake_sd_scripts(tmp_path):
    """An sd-scripts checkout as far as imports go: networks/lora.py, no __init__.py."""
    root = tmp_path / "sd-scripts"
    (root / "networks").mkdir(parents=True)
    (root / "networks" / "lora.py").write_text("WHO = 'sd-scripts lora'\n")
    return root


def run_python(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_copied_into_sd_scripts_networks_folder(tmp_path):
    root = fake_sd_scripts(tmp_path)
    for name in DROP_IN_FILES:
        shutil.copy(os.path.join(ROOT, "networks", name), root / "networks" / name)
    # sd-scripts imports the module by name after putting its own folder on sys.path
    out = run_python(
        "import importlib, os, sys; sys.path.insert(0, os.getcwd());"
        "import networks.lora; m = importlib.import_module('networks.para');"
        "import networks.adapter_base as b;"
        "print(networks.lora.WHO); print(m.__file__); print(b.__file__); print(callable(m.create_network))",
        root)
    who, para_file, base_file, ok = out.split("\n")[:4]
    assert who == "sd-scripts lora" and ok == "True"
    assert para_file.startswith(str(root)) and base_file.startswith(str(root))


def test_installed_package_joins_sd_scripts_networks(tmp_path):
    try:
        importlib.metadata.distribution("para-trainer")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("para-trainer is not installed in this environment (the README's test command installs it)")
    root = fake_sd_scripts(tmp_path)
    out = run_python(
        "import os, sys; sys.path.append(os.getcwd());"
        "import networks.lora, networks.para;"
        "print(networks.lora.WHO); print(networks.para.__file__)", root)
    who, para_file = out.split("\n")[:2]
    assert who == "sd-scripts lora"
    assert os.path.samefile(para_file, os.path.join(ROOT, "networks", "para.py")) or "site-packages" in para_file
