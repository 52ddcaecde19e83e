"""--optimizer_type names as sd-scripts knows them, each taking a real step on CPU."""

from types import SimpleNamespace

import pytest
import torch

from para_trainer.training.optimizers import OptimizerError, build_optimizer, parse_optimizer_args


def args(optimizer_type="", optimizer_args=None, use_8bit_adam=False, use_lion_optimizer=False):
    return SimpleNamespace(optimizer_type=optimizer_type, optimizer_args=optimizer_args, use_8bit_adam=use_8bit_adam,
                           use_lion_optimizer=use_lion_optimizer)


@pytest.mark.parametrize("name, expected_class", [
    ("", "AdamW"), ("AdamW", "AdamW"), ("AdamW8bit", "AdamW8bit"), ("PagedAdamW8bit", "PagedAdamW8bit"),
    ("Lion", "Lion"), ("Lion8bit", "Lion8bit"), ("SGDNesterov", "SGD"), ("Prodigy", "Prodigy"),
    ("torch.optim.Adam", "Adam"),
])
def test_each_optimizer_takes_a_step(name, expected_class):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))  # bitsandbytes' 8-bit states need >= 4096 elements
    optimizer, description = build_optimizer(args(name), [{"params": [weight], "lr": 1e-2}], 1e-2)
    assert type(optimizer).__name__ == expected_class and expected_class in description
    before = weight.detach().clone()
    weight.square().sum().backward()
    optimizer.step()
    assert not torch.equal(before, weight.detach())


def test_sgd_nesterov_gets_sd_scripts_momentum_and_optimizer_args_are_literals():
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer, description = build_optimizer(args("SGDNesterov", ["momentum=0.8", "weight_decay=1e-2"]),
                                              [{"params": [weight]}], 0.1)
    group = optimizer.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.8 and group["weight_decay"] == 0.01
    assert parse_optimizer_args(["betas=(0.9,0.99)", "mode=fast"]) == {"betas": (0.9, 0.99), "mode": "fast"}


def test_use_8bit_adam_is_adamw8bit():
    weight = torch.nn.Parameter(torch.zeros(4096))
    optimizer, _ = build_optimizer(args(use_8bit_adam=True), [{"params": [weight]}], 1e-3)
    assert type(optimizer).__name__ == "AdamW8bit"


@pytest.mark.parametrize("name, optimizer_args, message", [
    ("AdamQ", None, "unknown --optimizer_type 'AdamQ'"),
    ("no.such.Optimizer", None, "cannot import it"),
    ("AdamW", ["bogus=1"], "do not fit AdamW"),
    ("AdamW", ["betas"], "not key=value"),
])
def test_bad_optimizer_settings_give_one_clear_error(name, optimizer_args, message):
    with pytest.raises(OptimizerError, match=message):
        build_optimizer(args(name, optimizer_args), [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3)
