"""What the study trains: a method is a network module with its network args; a variant is a method at a rank.

Budgets (the issue's two comparisons, for each k in `KS`):
    equal parameters   PaRa r = 2k  against LoRA r = k   (PaRa has d_out·r parameters, LoRA r·(d_in + d_out))
    equal rank         PaRa r = k   against LoRA r = k
Learning rates: each method's default below is the best of the sweep ×{0.3, 1, 3} recorded in
docs/quality.md; `para-trainer quality --sweep` measures the sweep again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PRESETS = Path(__file__).resolve().parents[2] / "presets"
KS = (1, 2)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    module: str
    learning_rate: float
    network_args: tuple[str, ...] = ()
    network_alpha: float | None = None
    ranked: bool = True  # False: the rank does not apply (KronA's factor shapes are its own)
    conv_rank: bool = False  # network_args conv_dim = rank (LoCon)
    notes: str = ""
    in_default_study: bool = True  # False: runs only when --methods names it

    def args(self, rank: int) -> list[str]:
        """The trainer's network options for this method at `rank`."""
        argv = ["--network_module", self.module]
        if self.ranked:
            argv += ["--network_dim", str(rank)]
        if self.network_alpha is not None:
            argv += ["--network_alpha", str(self.network_alpha)]
        network_args = list(self.network_args) + ([f"conv_dim={rank}", f"conv_alpha={self.network_alpha or 1}"]
                                                  if self.conv_rank else [])
        if network_args:
            argv += ["--network_args", *network_args]
        return argv


METHODS = {m.name: m for m in (
    Method("para", "PaRa (full)", "networks.para", 1e-2, ("preset=full",),
           notes="the UNet's transformer blocks and the text encoder (sd-scripts' default targets)"),
    Method("para-exca", "PaRa (exca)", "networks.para", 1e-2, ("preset=exca",),
           notes="the paper's ExCA subset: UNet transformer and resnet blocks except cross-attention"),
    Method("para-exca-low-energy", "PaRa (exca, low-energy init)", "networks.para", 1e-2,
           ("preset=exca", "init=low_energy"), in_default_study=False,
           notes="PaRa (exca) started from W0's least-used output directions instead of random ones (init=low_energy): "
                 "the same method, without the change a random subspace makes before the first step"),
    Method("para+lora", "PaRa + LoRA (lora_dim)", "networks.para", 1e-2, ("preset=full", "lora_dim=1"),
           notes="the paper's composition, trained jointly: PaRa at the rank and a LoRA of rank 1 on the same "
                 "layers (ΔW = -QQᵀW0 + B A)"),
    Method("lora", "LoRA", "networks.lora", 1e-2, ("preset=full",), network_alpha=1.0,
           notes="sd-scripts' LoRA on the same layers as PaRa (full), alpha 1"),
    Method("locon", "LoCon (LyCORIS)", "lycoris.kohya", 1e-2,
           ("algo=locon", f"preset={PRESETS / 'lycoris_locon.toml'}"), network_alpha=1.0, conv_rank=True,
           notes="LyCORIS's kohya module, algo=locon: transformer and resnet blocks, samplers and the text encoder "
                 "(presets/lycoris_locon.toml), 3x3 convs at conv_dim = rank"),
    Method("lokr", "LoKr (LyCORIS)", "lycoris.kohya", 1e-2, ("algo=lokr", "preset=attn-mlp"), network_alpha=1.0,
           notes="LyCORIS's kohya module, algo=lokr, attention and MLP (sd-scripts' targets)"),
    Method("krona", "KronA (ours)", "networks.krona", 1e-2, ("preset=attention", "a1=4", "a2=16"), ranked=False,
           notes="DiffuseKronA's targets (q/k/v/out of self- and cross-attention), A of shape (4, 16)"),
)}

NOT_RUN = {
    "peft-para": "peft's PaRa (DEFT para=True) has no sd-scripts network module, so it cannot train through this "
                 "trainer; `para-trainer bench` compares its speed and memory on the same layers",
}


@dataclass(frozen=True)
class Variant:
    method: str
    rank: int
    lr_factor: float = 1.0
    budget: str = field(default="", compare=False)  # "k=1 equal params" ...: where this variant is compared

    @property
    def key(self) -> str:
        lr = "" if self.lr_factor == 1 else f"-lr{self.lr_factor:g}"
        return f"{self.method}-r{self.rank}{lr}"

    @property
    def learning_rate(self) -> float:
        return METHODS[self.method].learning_rate * self.lr_factor


def budget_variants(methods: list[str], ks=KS) -> list[Variant]:
    """Every PaRa method at r in {k, 2k}, every other ranked method at r = k, rank-free ones once."""
    variants: dict[str, Variant] = {}
    for method in methods:
        spec = METHODS[method]
        if not spec.ranked:
            variants.setdefault(f"{method}", Variant(method, 0))
            continue
        ranks = sorted({r for k in ks for r in ((k, 2 * k) if spec.module == "networks.para" else (k,))})
        for rank in ranks:
            variants.setdefault(f"{method}-{rank}", Variant(method, rank))
    return list(variants.values())
