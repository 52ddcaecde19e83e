"""The judge: a small image classifier that knows the toy world, for scoring what a model draws.

It predicts every attribute of a scene (object: the six shapes and the held-out concepts; colour; pattern;
background; position; size) and gives a 128-d identity embedding, the role DINO and CLIP play in the papers:
the cosine similarity between a sample's embedding and fresh renders' embeddings measures how well the sample
looks like a subject. It is trained on renders only (with blur and noise, so that decoded samples are judged
like renders), never on anything a diffusion model drew.

    judge = load_judge()                       # the shipped weights (judge.safetensors), nothing downloaded
    judge.predict(images)                      # {"object": [...], "colour": [...], ...} per image
    judge.embed(images)                        # (N, 128) unit vectors
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .checkpoints import resume, save_state
from .concepts import CONCEPTS
from .world import BACKGROUNDS, COLOURS, PATTERNS, POSITIONS, SHAPES, SIZES, Scene

HEADS = {
    "object": SHAPES + tuple(CONCEPTS),
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "background": BACKGROUNDS,
    "position": POSITIONS,
    "size": SIZES,
}
EMBEDDING_DIM = 128
WEIGHTS = Path(__file__).resolve().parent / "weights" / "judge.safetensors"


def labels(scene: Scene) -> dict[str, int]:
    """The class index per head; -1 where the head does not apply (a concept's surface pattern)."""
    out = {}
    for head, values in HEADS.items():
        value = scene.obj if head == "object" else getattr(scene, head)
        out[head] = -1 if head == "pattern" and scene.obj in CONCEPTS else values.index(value)
    return out


def label_array(scenes: list[Scene]) -> np.ndarray:
    return np.array([[labels(s)[h] for h in HEADS] for s in scenes], dtype=np.int64)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class JudgeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),  # 32
            _block(32, 32), nn.MaxPool2d(2),  # 16
            _block(32, 64), _block(64, 64), nn.MaxPool2d(2),  # 8
            _block(64, 128), _block(128, 128), nn.MaxPool2d(2),  # 4
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(inplace=True))
        self.embedding = nn.Linear(256, EMBEDDING_DIM)
        self.heads = nn.ModuleDict({h: nn.Linear(EMBEDDING_DIM if h == "object" else 256, len(v))
                                    for h, v in HEADS.items()})

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """images: (N, 3, 64, 64) in [0, 1]. Returns (logits per head, embedding before normalisation)."""
        trunk = self.trunk(self.features(images * 2 - 1))
        embedding = self.embedding(trunk)
        logits = {h: head(embedding if h == "object" else trunk) for h, head in self.heads.items()}
        return logits, embedding


def to_tensor(images) -> torch.Tensor:
    """uint8 arrays (N, H, W, 3), PIL images or float tensors (N, 3, H, W) in [0, 1] -> (N, 3, 64, 64) floats."""
    if isinstance(images, torch.Tensor):
        batch = images.float()
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(image.convert("RGB")) for image in images])
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    if batch.shape[-2:] != (64, 64):
        batch = F.interpolate(batch, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return batch


class Judge:
    """The trained judge, on the CPU, in eval mode."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @torch.no_grad()
    def _run(self, images, batch_size: int = 256):
        batch = to_tensor(images)
        logits, embeddings = [], []
        for start in range(0, len(batch), batch_size):
            out, emb = self.net(batch[start:start + batch_size])
            logits.append(out)
            embeddings.append(emb)
        merged = {h: torch.cat([part[h] for part in logits]) for h in HEADS}
        return merged, torch.cat(embeddings)

    def probabilities(self, images) -> dict[str, torch.Tensor]:
        logits, _ = self._run(images)
        return {h: v.softmax(-1) for h, v in logits.items()}

    def predict(self, images) -> dict[str, list[str]]:
        logits, _ = self._run(images)
        return {h: [HEADS[h][i] for i in v.argmax(-1).tolist()] for h, v in logits.items()}

    def embed(self, images) -> torch.Tensor:
        _, embeddings = self._run(images)
        return F.normalize(embeddings, dim=-1)

    def similarity(self, images, references) -> torch.Tensor:
        """Per image: the mean cosine similarity of its embedding to the references' (DINO-style identity score)."""
        return (self.embed(images) @ self.embed(references).T).mean(dim=1)


def load_judge(path=WEIGHTS) -> Judge:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the judge's weights are missing: {path} (para-trainer toyworld train-judge "
                                "writes them)")
    net = JudgeNet()
    net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return Judge(net)


def save_judge(net: JudgeNet, path=WEIGHTS, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# Training


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a decoder does to a render: softened edges (a random blur), a little noise and a brightness drift."""
    n = batch.shape[0]
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :]) / 16
    blurred = F.conv2d(F.pad(batch, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3).contiguous(), groups=3)
    amount = torch.rand(n, 1, 1, 1, generator=generator)
    amount = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, amount, torch.zeros_like(amount))
    batch = batch + (blurred - batch) * amount
    batch = batch * (0.92 + 0.16 * torch.rand(n, 1, 1, 1, generator=generator))
    sigma = 0.04 * torch.rand(n, 1, 1, 1, generator=generator)
    return (batch + sigma * torch.randn(batch.shape, generator=generator)).clamp(0, 1)


def _loss(logits: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(logits[h], targets[:, i], ignore_index=-1) for i, h in enumerate(HEADS))


def train_judge(images: np.ndarray, targets: np.ndarray, workdir, steps: int = 2500, batch_size: int = 128,
                lr: float = 2e-3, seed: int = 0, log=print) -> JudgeNet:
    """Train on (images, label rows); resumable from ``workdir/judge-state.pt`` (tensors only, read weights-only)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / "judge-state.pt"
    torch.manual_seed(seed)
    net = JudgeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start, _ = resume(state_path, {"net": net}, optimizer, log, "judge")
    all_images = torch.from_numpy(images)
    all_targets = torch.from_numpy(targets)
    net.train()
    began = time.time()
    for step in range(start, steps):
        for group in optimizer.param_groups:  # one-cycle-ish: warm up, then cosine down to 2%
            warm = min(1.0, (step + 1) / 100)
            group["lr"] = lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(0, len(all_images), (batch_size,), generator=generator)
        batch = all_images[index].permute(0, 3, 1, 2).float() / 255
        logits, _ = net(augment(batch, generator))
        loss = _loss(logits, all_targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"judge step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - began:.0f}s)")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            save_state({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, state_path)
    return net.eval()


def accuracy(judge: Judge, images, scenes: list[Scene]) -> dict[str, float]:
    """Per head: the share of images whose attribute the judge gets right (heads that apply only)."""
    predicted = judge.predict(images)
    targets = label_array(scenes)
    out = {}
    for i, head in enumerate(HEADS):
        mask = targets[:, i] >= 0
        hits = [HEADS[head].index(p) == t for p, t, m in zip(predicted[head], targets[:, i], mask) if m]
        out[head] = float(np.mean(hits)) if hits else float("nan")
    return out


@torch.no_grad()
def round_trips(vae, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The images encoded and decoded by a VAE (posterior mean), as uint8: what a decoder makes of a render."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample
        out.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def build(workdir, steps: int = 2500, world_images: int = 40000, concept_images: int = 15000, seed: int = 1,
          out=WEIGHTS, vae=None, round_trip_every: int = 4, log=print) -> dict[str, dict[str, float]]:
    """Render the judge's training set, train it, save the fp16 weights to ``out`` and return its accuracy per
    head on fresh renders (other seeds: 3000 scenes of the world, held-out pairs included, and 1500 of concepts).

    With a ``vae`` (toy-sd1's), every ``round_trip_every``-th training render is added once more as the VAE
    decodes it, so that the judge reads decoded samples as it reads renders; the accuracy is then also reported on
    the round trips of the fresh renders."""
    from .dataset import concept_scenes, rendered_set, world_scenes

    workdir = Path(workdir)
    scenes = world_scenes(world_images, seed, allow_held_out=True) + concept_scenes(concept_images, seed)
    images = rendered_set(workdir / "judge-data", "judge", scenes)
    targets = label_array(scenes)
    if vae is not None:
        log(f"judge: decoding {len(images[::round_trip_every])} renders with the VAE")
        images = np.concatenate([images, round_trips(vae, images[::round_trip_every])])
        targets = np.concatenate([targets, targets[::round_trip_every]])
    net = train_judge(images, targets, workdir, steps=steps, seed=seed, log=log)
    test_scenes = world_scenes(3000, seed + 1000, allow_held_out=True) + concept_scenes(1500, seed + 1000)
    test_images = rendered_set(workdir / "judge-data", "judge-test", test_scenes)
    judge = Judge(net)
    result = {"renders": accuracy(judge, test_images, test_scenes)}
    if vae is not None:
        result["vae round trips"] = accuracy(judge, round_trips(vae, test_images), test_scenes)
    save_judge(net, out, {"accuracy": result, "steps": steps, "seed": seed, "vae_round_trips": vae is not None})
    for name, row in result.items():
        log(f"judge accuracy on fresh {name}: " + ", ".join(f"{h} {v:.4f}" for h, v in row.items()))
    return result
