"""PaRa's math on single layers: the hooked forward, merging and restoring against W0 - m·QQᵀW0."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks import para


class Transformer2DModel(nn.Module):
    """Stands in for diffusers' block of the same class name (targets are matched by class name)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer


class ResnetBlock2D(Transformer2DModel):
    pass


class TinyUNet(nn.Module):
    def __init__(self, layer, block):
        super().__init__()
        self.block = block(layer)

    def forward(self, x):  # through the root, so the network's once-per-call factorization runs as in training
        return self.block.layer(x)


LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), Transformer2DModel, lambda: torch.randn(3, 7, 24)),
    "conv1x1": (lambda: nn.Conv2d(12, 20, 1), Transformer2DModel, lambda: torch.randn(2, 12, 5, 6)),
    "conv3x3": (lambda: nn.Conv2d(12, 20, 3, padding=1, stride=2), ResnetBlock2D, lambda: torch.randn(2, 12, 9, 8)),
}


def build(kind, rank=5, multiplier=1.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    make_layer, block, make_input = LAYERS[kind]
    unet = TinyUNet(make_layer(), block).to(dtype)
    network = para.create_network(multiplier, rank, 1, None, None, unet, conv_dim=str(rank))
    network.to(dtype)
    network.apply_to(None, unet, False, True)
    (module,) = network.adapter_modules
    with torch.no_grad():  # move B away from its orthonormal init so that Q != B
        module.para_b.add_(0.3 * torch.randn_like(module.para_b))
    return unet, network, module, make_input().to(dtype)


def reference_output(layer, x, w):
    bias = None if layer.bias is None else layer.bias.to(w.dtype)
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, bias)
    return F.conv2d(x, w, bias, layer.stride, layer.padding)


def projected_weight(w0, b, multiplier):
    q, _ = torch.linalg.qr(b.double())
    flat = w0.double().reshape(w0.shape[0], -1)
    return (flat - multiplier * q @ (q.T @ flat)).reshape(w0.shape)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_forward_merge_and_restore_match_projected_weight(kind, multiplier):
    unet, network, module, x = build(kind, multiplier=multiplier)
    layer = module.layer
    w0 = layer.weight.detach().clone()
    expected = reference_output(layer, x.double(), projected_weight(w0, module.para_b.detach(), multiplier)).float()
    with torch.no_grad():
        hooked = layer(x)
    assert relative_error(hooked, expected) <= 1e-5

    network.merge_to()
    with torch.no_grad():
        merged = layer(x)  # the hook must not project a second time
    assert relative_error(merged, hooked) <= 1e-5
    assert not torch.equal(layer.weight, w0)

    network.restore_weights()
    assert torch.equal(layer.weight, w0)
    network.restore()
    assert "forward" not in layer.__dict__  # the layer's own forward is back
    with torch.no_grad():
        assert torch.equal(layer(x), reference_output(layer, x, w0))


def test_projection_invariants_of_merged_weight():
    torch.manual_seed(1)
    unet = TinyUNet(nn.Linear(32, 32, bias=False), Transformer2DModel).double()
    rank = 6
    network = para.create_network(1.0, rank, 1, None, None, unet).double()
    network.apply_to(None, unet, False, True)
    with torch.no_grad():
        network.adapter_modules[0].para_b.add_(torch.randn(32, rank, dtype=torch.float64))
    w0 = unet.block.layer.weight.detach().clone()
    network.merge_to()
    m = (w0 - unet.block.layer.weight.detach()) @ torch.linalg.inv(w0)
    assert torch.allclose(m @ m, m, atol=1e-10)
    assert torch.allclose(m, m.T, atol=1e-10)
    assert abs(torch.trace(m).item() - rank) < 1e-10
    assert torch.linalg.matrix_rank(m).item() == rank


# Training runs on B and the Cholesky factor of BᵀB instead of Householder Q: Linear layers through one function
# with its gradient written out (any number of rows), convs implicitly while a layer sees fewer rows than it has
# outputs and with Q = B L⁻ᵀ formed otherwise, and Householder QR for an ill-conditioned B.
TRAINING_INPUTS = {
    "linear": {"implicit": (3, 7, 24), "formed": (3, 20, 24)},  # "formed" only by row count: both run the function
    "conv1x1": {"implicit": (1, 12, 2, 2), "formed": (2, 12, 5, 6)},
    "conv3x3": {"implicit": (1, 12, 3, 3), "formed": (2, 12, 9, 8)},
}


def train_forward_and_gradient(kind, shape, spread, bias=True, multiplier=0.6):
    unet, network, module, _ = build(kind, multiplier=multiplier, dtype=torch.float64)
    if not bias:
        module.layer.bias = None
    with torch.no_grad():
        module.para_b.mul_(torch.logspace(0, -spread, module.rank, dtype=torch.float64))  # cond(B) ~ 10^spread
    network.train()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = unet(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()

    b = module.para_b.detach().clone().requires_grad_(True)
    x_reference = x.detach().clone().requires_grad_(True)
    q, _ = torch.linalg.qr(b)
    w0 = module.layer.weight.reshape(module.layer.weight.shape[0], -1)
    expected = reference_output(module.layer, x_reference,
                                (w0 - multiplier * q @ (q.T @ w0)).reshape(module.layer.weight.shape))
    (expected * weights).sum().backward()
    assert relative_error(x.grad, x_reference.grad) <= 1e-12  # the gradient that flows on to earlier layers
    return out, expected, module, b.grad


@pytest.mark.parametrize("bias, multiplier", [(True, 0.6), (False, 0.6), (True, 1.0)])
@pytest.mark.parametrize("rows", ["implicit", "formed"])
@pytest.mark.parametrize("kind", LAYERS)
def test_training_forward_and_gradient_equal_householder_math(kind, rows, bias, multiplier, monkeypatch):
    used = []
    for name in ("para_remove_from_linear", "gram_coefficients", "gram_q", "orthonormal_basis"):
        monkeypatch.setattr(para, name, lambda *a, _f=getattr(para, name), _n=name: (used.append(_n), _f(*a))[1])
    out, expected, module, expected_grad = train_forward_and_gradient(kind, TRAINING_INPUTS[kind][rows], 0.5, bias,
                                                                      multiplier)
    path = "gram_coefficients" if rows == "implicit" else "gram_q"
    assert used == (["para_remove_from_linear"] if kind == "linear" else [path])  # no QR in training
    assert relative_error(out, expected) <= 1e-12
    assert relative_error(module.para_b.grad, expected_grad) <= 1e-10
    assert 0.15 < module.conditioning.item() < 0.6  # min|R_ii| / max|R_ii| of QR(B): about 10^-spread


@pytest.mark.parametrize("kind", LAYERS)
def test_trainable_base_layer_gets_the_projected_layers_gradients(kind):
    # PaRa leaves the bias alone (W0 x + b -> (W0 - sQQᵀW0) x + b), so a base layer trained along (full fine-tuning
    # with a PaRa on top) must get exactly the gradients of that layer, the bias's too
    unet, network, module, _ = build(kind, multiplier=0.7, dtype=torch.float64)
    module.layer.requires_grad_(True)
    network.train()
    x = torch.randn(TRAINING_INPUTS[kind]["formed"], dtype=torch.float64)
    out = unet(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    weight_grad, bias_grad = module.layer.weight.grad.clone(), module.layer.bias.grad.clone()

    module.layer.zero_grad()
    expected = reference_output(module.layer, x, projected_weight(module.layer.weight, module.para_b.detach(), 0.7))
    (expected * weights).sum().backward()
    assert relative_error(bias_grad, module.layer.bias.grad) <= 1e-12
    assert relative_error(weight_grad, module.layer.weight.grad) <= 1e-12


def test_one_batched_gram_gives_each_b_its_own_basis_and_gradient():
    torch.manual_seed(4)
    bs = [(torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64))[0] + 0.1 * torch.randn(30, 4, dtype=torch.float64)
           ).requires_grad_(True) for _ in range(3)]
    weights = [torch.randn(30, 30, dtype=torch.float64) for _ in bs]
    bases, ratio = para.gram_bases(bs)
    loss = sum((para.gram_q(basis) @ para.gram_q(basis).T * w).sum() for basis, w in zip(bases, weights))
    grads = torch.autograd.grad(loss, bs)
    for b, w, grad, basis, conditioning in zip(bs, weights, grads, bases, ratio):
        q, r = torch.linalg.qr(b)
        expected = torch.autograd.grad((q @ q.T * w).sum(), b)[0]
        assert relative_error(grad, expected) <= 1e-10
        assert torch.allclose(para.gram_q(basis) @ para.gram_q(basis).T, q @ q.T, atol=1e-12)
        diagonal = r.diagonal().abs()
        assert conditioning.item() == pytest.approx((diagonal.min() / diagonal.max()).item(), rel=1e-10)


def test_ill_conditioned_b_trains_through_householder_qr(monkeypatch):
    used = []
    monkeypatch.setattr(para, "orthonormal_basis", lambda b, _f=para.orthonormal_basis: (used.append(1), _f(b))[1])
    out, expected, module, expected_grad = train_forward_and_gradient("linear", (3, 7, 24), spread=2)
    assert used == [1] and module.conditioning.item() < para.GRAM_MIN_RATIO
    assert relative_error(out, expected) <= 1e-12
    assert relative_error(module.para_b.grad, expected_grad) <= 1e-8


def test_batched_bases_equal_per_module_qr():
    torch.manual_seed(2)
    bs = [torch.randn(40, 4) for _ in range(3)]
    q_batched, _ = para.orthonormal_basis(torch.stack(bs))
    for b, q in zip(bs, q_batched):
        q_single, _ = torch.linalg.qr(b)
        assert torch.allclose(q @ q.T, q_single @ q_single.T, atol=1e-6)


def test_qr_runs_in_float32_under_autocast():
    b = torch.randn(40, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, conditioning = para.orthonormal_basis(b)
    assert q.dtype == torch.float32
    assert torch.allclose(q.T @ q, torch.eye(4), atol=1e-6)
    assert 0 < conditioning.item() <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYERS)
def test_autocast_forward_and_backward_stay_finite(kind, dtype):
    unet, network, module, x = build(kind)
    network.train()
    with torch.autocast("cpu", dtype=dtype):
        out = unet(x)  # training's factorization (GramBasis) through the root
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert module.para_b.grad is not None and torch.isfinite(module.para_b.grad).all()
    assert module.para_b.grad.abs().sum() > 0


def test_rank_loss_is_detected_not_trained_on():
    unet, network, module, x = build("linear")
    with torch.no_grad():
        module.para_b[:, 1] = module.para_b[:, 0]  # two equal columns: rank lost
        module.layer(x)
    with pytest.raises(para.ParaRankLossError, match="lost rank"):
        network.on_step_start()
    for value in (float("nan"), float("-inf")):  # one entry is enough
        with torch.no_grad():
            module.para_b.copy_(torch.linalg.qr(torch.randn_like(module.para_b))[0])
            module.para_b[3, 2] = value
        with pytest.raises(para.ParaRankLossError, match="NaN"):
            network.save_weights("/nonexistent/never-written.safetensors")


def test_dropouts_only_act_in_training():
    torch.manual_seed(3)
    unet = TinyUNet(nn.Linear(24, 40), Transformer2DModel)
    network = para.create_network(1.0, 5, 1, None, None, unet, neuron_dropout=0.5, rank_dropout="0.5",
                                  module_dropout="0.5")
    network.apply_to(None, unet, False, True)
    x = torch.randn(4, 24)
    network.eval()
    with torch.no_grad():
        assert torch.equal(unet.block.layer(x), unet.block.layer(x))
    network.train()
    with torch.no_grad():
        outputs = {tuple(unet.block.layer(x).flatten()[:8].tolist()) for _ in range(8)}
    assert len(outputs) > 1


@pytest.mark.parametrize("kind", LAYERS)
def test_low_energy_init_is_the_smallest_change_a_rank_r_para_can_make(kind):
    """init=low_energy: ‖ΔW‖ is the Eckart-Young floor (the r smallest singular values of W0; zero on layers with
    more outputs than inputs), well below the paper's random init; B orthonormal; and the gradient still flows."""
    rank = 5
    torch.manual_seed(0)
    make_layer, block, make_input = LAYERS[kind]
    unet = TinyUNet(make_layer(), block)
    w0 = unet.block.layer.weight.detach().clone()
    singular = torch.linalg.svdvals(w0.reshape(w0.shape[0], -1).double())
    singular = torch.cat([singular, singular.new_zeros(max(0, w0.shape[0] - singular.numel()))])  # unused outputs
    floor = singular[-rank:].square().sum().sqrt().item()
    change = {}
    for init in ("orthogonal", "low_energy"):
        network = para.create_network(1.0, rank, 1, None, None, unet, conv_dim=str(rank), init=init)
        (module,) = network.adapter_modules
        b = module.para_b.detach().double()
        assert torch.allclose(b.T @ b, torch.eye(rank, dtype=b.dtype), atol=1e-5)
        change[init] = (projected_weight(w0, b, 1.0) - w0.double()).norm().item()
    assert change["low_energy"] == pytest.approx(floor, abs=1e-5)
    assert change["low_energy"] < 0.9 * change["orthogonal"], change  # 0.70 on random conv weights, the closest
    network.apply_to(None, unet, False, True)
    unet(make_input()).square().sum().backward()
    assert module.para_b.grad.norm() > 1e-3  # removing nothing yet, but not stuck there


def test_unknown_init_names_the_choices():
    with pytest.raises(Exception, match="orthogonal, low_energy"):
        para.create_network(1.0, 2, 1, None, None, TinyUNet(nn.Linear(8, 8), Transformer2DModel), init="random")
