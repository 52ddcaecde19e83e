"""sd-webui-para and `para-trainer webui install`, against a stand-in of the WebUI's built-in Lora extension.

The stand-in follows the contract described in shared/reference/frontend-formats.md §1.1-§1.4 (A1111 v1.10):
keys split at the first dot and grouped per module, `networks.module_types` asked in order (first non-None
create_module wins, AssertionError if none), finalize_updown = bias, reshape, × calc_scale × multiplier, and
weight application that hands each network the running weight. A real WebUI is not installable here.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from networks import para
from para_trainer.commands import webui
from para_trainer.models import tiny as tiny_models

SCRIPT = "scripts/para_network.py"


# --------------------------------------------------------------------------------------------------
# Stand-in of the built-in Lora extension's `network` and `networks` modules


def make_network_module() -> types.ModuleType:
    network = types.ModuleType("network")

    class NetworkWeights:
        def __init__(self, network_key, sd_key, w, sd_module):
            self.network_key, self.sd_key, self.w, self.sd_module = network_key, sd_key, w, sd_module

    class Network:
        def __init__(self, name, te_multiplier=1.0, unet_multiplier=1.0):
            self.name, self.te_multiplier, self.unet_multiplier = name, te_multiplier, unet_multiplier
            self.modules = {}

    class ModuleType:
        def create_module(self, net, weights):
            return None

    class NetworkModule:
        def __init__(self, net, weights):
            self.network, self.network_key, self.sd_key = net, weights.network_key, weights.sd_key
            self.sd_module = weights.sd_module
            self.dim = None
            self.bias = weights.w.get("bias")
            self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
            self.scale = weights.w["scale"].item() if "scale" in weights.w else None

        def multiplier(self):
            return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

        def calc_scale(self):
            if self.scale is not None:
                return self.scale
            if self.dim is not None and self.alpha is not None:
                return self.alpha / self.dim
            return 1.0

        def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
            if self.bias is not None:
                updown = updown.reshape(self.bias.shape) + self.bias.to(orig_weight.device, updown.dtype)
            updown = updown.reshape(output_shape)
            if ex_bias is not None:
                ex_bias = ex_bias * self.multiplier()
            return updown * self.calc_scale() * self.multiplier(), ex_bias

        def calc_updown(self, target):
            raise NotImplementedError

    for cls in (NetworkWeights, Network, ModuleType, NetworkModule):
        setattr(network, cls.__name__, cls)
    return network


def make_networks_module(network) -> types.ModuleType:
    networks = types.ModuleType("networks")

    class ModuleTypeLora(network.ModuleType):  # stand-ins of the built-in types: they must leave para_q alone
        def create_module(self, net, weights):
            return "lora" if {"lora_up.weight", "lora_down.weight"} <= set(weights.w) else None

    class ModuleTypeIa3(network.ModuleType):
        def create_module(self, net, weights):
            return "ia3" if "weight" in weights.w else None

    def load_network(name, state_dict, layers, te_multiplier=1.0, unet_multiplier=1.0):
        net = network.Network(name, te_multiplier, unet_multiplier)
        groups = {}
        for key, tensor in state_dict.items():
            network_key, part = key.split(".", 1)
            if network_key not in layers:
                continue  # the WebUI only logs keys it cannot map
            # the WebUI's compvis names: text-encoder keys start with "transformer_" (what multiplier() reads)
            sd_key = network_key.replace("lora_te_", "transformer_", 1).replace("lora_unet_", "diffusion_model_", 1)
            groups.setdefault(network_key, network.NetworkWeights(network_key, sd_key, {}, layers[network_key]))
            groups[network_key].w[part] = tensor
        for key, weights in groups.items():
            for module_type in networks.module_types:
                module = module_type.create_module(net, weights)
                if module is not None:
                    break
            else:
                raise AssertionError(f"Could not find a module type (one that can read {', '.join(weights.w)}) "
                                     f"for {key}")
            net.modules[key] = module
        return net

    def apply_networks(weights, nets):
        """network_apply_weights: each network, in prompt order, sees the running weight."""
        result = {}
        for key, weight in weights.items():
            for net in nets:
                if key in net.modules:
                    updown, _ = net.modules[key].calc_updown(weight)
                    weight = (weight.to(updown.dtype) + updown).to(weight.dtype)
            result[key] = weight
        return result

    networks.module_types = [ModuleTypeLora(), ModuleTypeIa3()]
    networks.load_network = load_network
    networks.apply_networks = apply_networks
    return networks


# --------------------------------------------------------------------------------------------------
# Fixtures


def fake_webui(root):
    (root / "extensions-builtin" / "Lora").mkdir(parents=True)
    (root / "extensions-builtin" / "Lora" / "networks.py").write_text("# stand-in\n")
    return root


@pytest.fixture
def webui_env(monkeypatch):
    """The stand-in modules as `network`/`networks` (para-trainer's own `networks` comes back afterwards)."""
    network = make_network_module()
    networks = make_networks_module(network)
    monkeypatch.setitem(sys.modules, "network", network)
    monkeypatch.setitem(sys.modules, "networks", networks)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in the package's extension folder
    before = set(sys.modules)
    yield networks
    for name in set(sys.modules) - before:  # the extension's core package and script modules
        if name.startswith((webui.CORE_PACKAGE, "para_network")):
            del sys.modules[name]


def import_script(path, name="para_network"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return webui.install_extension(fake_webui(tmp_path_factory.mktemp("webui")))


@pytest.fixture(scope="module")
def sd1():
    return tiny_models.build_tiny_pipeline("sd1", seed=0)


def para_file(sd1, path, seed, dtype=None):
    """A native PaRa file on the tiny SD1 model (3x3 convs included), with random B; returns {name: (layer, B)}."""
    network = para.create_network(1.0, 2, 1, None, sd1.text_encoder, sd1.unet, conv_dim="2")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.adapter_modules:
            module.para_b.copy_(torch.randn(module.para_b.shape, generator=generator))
    network.save_weights(str(path), dtype=dtype)
    return {m.lora_name: (m.layer, m.para_b.detach().double()) for m in network.adapter_modules}


def projection(b):
    q, _ = torch.linalg.qr(b)
    return q @ q.t()


def rel_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


# --------------------------------------------------------------------------------------------------
# The extension in the stand-in


def test_registers_once_even_when_imported_twice(webui_env, installed):
    import_script(installed / SCRIPT, "para_network")
    import_script(installed / SCRIPT, "para_network_again")
    names = [type(t).__name__ for t in webui_env.module_types]
    assert names == ["ModuleTypeLora", "ModuleTypeIa3", "ModuleTypePara"]


@pytest.mark.parametrize("te, unet", [(1.0, 1.0), (0.5, 0.5), (1.0, 0.5)])
def test_native_file_gives_minus_m_qqt_w_for_every_module(webui_env, installed, sd1, tmp_path, te, unet):
    import_script(installed / SCRIPT)
    adapters = para_file(sd1, tmp_path / "a.safetensors", seed=1)
    layers = {name: layer for name, (layer, _) in adapters.items()}
    net = webui_env.load_network("a", load_file(tmp_path / "a.safetensors"), layers, te, unet)
    assert set(net.modules) == set(adapters)
    assert any(layer.weight.dim() == 4 and layer.weight.shape[-1] == 3 for layer in layers.values())
    assert any(name.startswith("lora_te_") for name in adapters)
    for name, (layer, b) in adapters.items():
        w0 = layer.weight.detach()
        m = te if name.startswith("lora_te_") else unet
        expected = -m * (projection(b) @ w0.double().reshape(w0.shape[0], -1)).reshape(w0.shape)
        updown, ex_bias = net.modules[name].calc_updown(w0)
        assert updown.shape == w0.shape and ex_bias is None
        assert rel_error(updown, expected) <= 1e-5, name


def test_fp16_file_still_removes_a_projection(webui_env, installed, sd1, tmp_path):
    script = import_script(installed / SCRIPT)
    adapters = para_file(sd1, tmp_path / "h.safetensors", seed=2, dtype=torch.float16)
    state = load_file(tmp_path / "h.safetensors")
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    q16 = state[f"{name}.{para.Q_KEY}"]
    assert q16.dtype == torch.float16
    layers = {n: layer for n, (layer, _) in adapters.items()}
    net = webui_env.load_network("h", state, layers)
    eye = torch.eye(q16.shape[0])
    p = -net.modules[name].calc_updown(eye)[0].double()  # ΔW on W = I is -P
    error = (p @ p - p).abs().max().item()
    raw = q16.double() @ q16.double().t()
    assert error < 1e-7 and (p - p.t()).abs().max().item() < 1e-7
    assert (raw @ raw - raw).abs().max().item() > 10 * error  # the stored fp16 Q alone is a worse projection
    assert (p - projection(adapters[name][1])).abs().max().item() < 1e-2  # and the same subspace
    assert script.NetworkModulePara is type(net.modules[name])


def test_two_para_files_apply_sequentially(webui_env, installed, sd1, tmp_path):
    import_script(installed / SCRIPT)
    first = para_file(sd1, tmp_path / "1.safetensors", seed=3)
    second = para_file(sd1, tmp_path / "2.safetensors", seed=4)
    layers = {name: layer for name, (layer, _) in first.items()}
    nets = [webui_env.load_network(f"n{i}", load_file(tmp_path / f"{i}.safetensors"), layers) for i in (1, 2)]
    w0 = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    applied = webui_env.apply_networks(w0, nets)
    for name in ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        w = w0[name].double().reshape(w0[name].shape[0], -1)
        p1, p2 = projection(first[name][1]), projection(second[name][1])
        i = torch.eye(w.shape[0], dtype=torch.float64)
        sequential = ((i - p2) @ (i - p1) @ w).reshape(w0[name].shape)
        additive = (w - p1 @ w - p2 @ w).reshape(w0[name].shape)
        assert rel_error(applied[name], sequential) <= 1e-5
        assert rel_error(applied[name], additive) > 1e-3


def test_merged_and_para_lora_files_load_as_their_chain(webui_env, installed, sd1, tmp_path):
    """A `para-trainer merge` result (stage keys, strengths, a LoRA stage) gives the chain's ΔW on every layer."""
    from para_trainer.files.merge import merge

    import_script(installed / SCRIPT)
    first = para_file(sd1, tmp_path / "1.safetensors", seed=5)
    para_file(sd1, tmp_path / "2.safetensors", seed=6)
    merge([(str(tmp_path / "1.safetensors"), 1.0), (str(tmp_path / "2.safetensors"), 0.5)], tmp_path / "m.safetensors")
    state = load_file(tmp_path / "m.safetensors")
    layers = {name: layer for name, (layer, _) in first.items()}
    net = webui_env.load_network("m", state, layers, 0.8, 0.8)
    assert set(net.modules) == set(first)
    for name, layer in layers.items():
        w0 = layer.weight.detach()
        stages = para.stages_from_file({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")},
                                       name)
        expected = para.chain_delta_weight(w0.double(), stages, 0.8)
        assert rel_error(net.modules[name].calc_updown(w0)[0], expected) <= 1e-5, name


def test_without_the_extension_the_file_is_rejected(webui_env, sd1, tmp_path):
    adapters = para_file(sd1, tmp_path / "a.safetensors", seed=1)
    layers = {name: layer for name, (layer, _) in adapters.items()}
    with pytest.raises(AssertionError, match="Could not find a module type"):
        webui_env.load_network("a", load_file(tmp_path / "a.safetensors"), layers)


def test_script_uses_installed_para_trainer_when_lib_is_missing(webui_env):
    script = import_script(webui.extension_source() / SCRIPT)  # the package copy has no lib/
    assert script._find_core_directory() == str(webui.core_source())
    assert script.Q_KEY == para.Q_KEY
    assert [type(t).__name__ for t in webui_env.module_types][-1] == "ModuleTypePara"


# --------------------------------------------------------------------------------------------------
# install_extension


def test_install_copies_extension_and_para_math(tmp_path):
    target = webui.install_extension(fake_webui(tmp_path))
    assert target == tmp_path / "extensions" / "sd-webui-para"
    for name in (SCRIPT, "metadata.ini", "README.md", "lib/sd_webui_para_core/__init__.py"):
        assert (target / name).is_file(), name
    for name in webui.CORE_FILES:
        assert (target / "lib" / webui.CORE_PACKAGE / name).read_bytes() == (webui.core_source() / name).read_bytes()
    assert "After = lora" in (target / "metadata.ini").read_text()
    assert sorted(p.name for p in (tmp_path / "extensions").iterdir()) == ["sd-webui-para"]  # no staging left


def test_install_keeps_an_identical_install_and_refuses_a_different_one(tmp_path):
    target = webui.install_extension(fake_webui(tmp_path))
    assert webui.install_extension(tmp_path) == target
    edited = target / "README.md"
    edited.write_text("local edit")
    with pytest.raises(webui.InstallError, match="different sd-webui-para.*--force"):
        webui.install_extension(tmp_path)
    assert edited.read_text() == "local edit"
    webui.install_extension(tmp_path, force=True)
    assert edited.read_bytes() == (webui.extension_source() / "README.md").read_bytes()
    assert sorted(p.name for p in (tmp_path / "extensions").iterdir()) == ["sd-webui-para"]


def test_install_into_a_folder_that_is_not_a_webui_writes_nothing(tmp_path):
    (tmp_path / "extensions-builtin").mkdir()
    with pytest.raises(webui.InstallError, match="not an AUTOMATIC1111/Forge-with-A1111-Lora WebUI folder"):
        webui.install_extension(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["extensions-builtin"]


def test_cli_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    webui.add_subcommand(parser.add_subparsers(dest="command", required=True))
    options = parser.parse_args(["webui", "install", str(fake_webui(tmp_path)), "--force"])
    assert options.force and options.run(options) == 0
    assert (tmp_path / "extensions" / "sd-webui-para" / SCRIPT).is_file()
    options = parser.parse_args(["webui", "install", str(tmp_path / "nowhere")])
    assert options.run(options) == 2
    assert "not an AUTOMATIC1111" in capsys.readouterr().err
