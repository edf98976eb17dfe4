"""A feature extractor for 32x32 Shapes images, for FID/KID and diversity in a meaningful space.

Inception-v3 features (Heusel et al. 2017) are trained on ImageNet photographs at 299x299; on 32x32
flat-coloured shapes they mostly measure upsampling artefacts. `ShapesFeatureNet` is a small CNN
trained on the world itself (`scripts/train_shapes_features.py`): from a rendered image it regresses
the scene's content -- how many objects of each shape and of each colour, the object count, and the
mean object position. Its penultimate layer (`num_features` = 64 values) is the feature space: two
image sets are close in it when they show similar objects, colours, counts and layouts.

The shipped weights live in `diffalign/evaluate/weights/shapes_features.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffalign.world.palette import COLORS, SHAPES
from diffalign.world.scene import SceneBatch

WEIGHTS_PATH = Path(__file__).parent / "weights" / "shapes_features.safetensors"
#: Regression targets: count per shape, count per colour, object count, mean x, mean y.
NUM_TARGETS = len(SHAPES) + len(COLORS) + 3


class ShapesFeatureNet(nn.Module):
    """conv 3->32->64->64 (each 3x3 + ReLU + 2x2 max-pool) -> linear to `num_features` -> target head.

    `forward` takes [B, 3, H, W] images, uint8 in [0, 255] or float in [0, 1] (as torchmetrics' FID
    passes them), and returns the [B, num_features] features; `predict` returns the scene targets.
    """

    def __init__(self, num_features: int = 64) -> None:
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, num_features),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(num_features, NUM_TARGETS))

    @staticmethod
    def to_float(images: Tensor) -> Tensor:
        """uint8 [0, 255] or float [0, 1] images -> float32 in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ShapesFeatureNet needs [B, 3, H, W] images, got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        return images.float()

    def forward(self, images: Tensor) -> Tensor:
        return self.body(self.to_float(images) * 2 - 1)

    def predict(self, images: Tensor) -> Tensor:
        """[B, NUM_TARGETS] predicted scene targets (see `scene_targets`)."""
        return self.head(self.forward(images))


def scene_targets(scenes: SceneBatch) -> Tensor:
    """[B, NUM_TARGETS] float32: counts per shape, counts per colour, object count, mean x, mean y
    (0.5 for an empty scene)."""
    valid = scenes.valid
    shape_counts = torch.stack([((scenes.shape == i) & valid).sum(1) for i in range(len(SHAPES))], 1)
    color_counts = torch.stack([((scenes.color == i) & valid).sum(1) for i in range(len(COLORS))], 1)
    n = valid.sum(1)
    denom = n.clamp_min(1).float()
    mean_x = torch.where(n > 0, (scenes.x * valid).sum(1) / denom, torch.full_like(denom, 0.5))
    mean_y = torch.where(n > 0, (scenes.y * valid).sum(1) / denom, torch.full_like(denom, 0.5))
    return torch.cat(
        [shape_counts.float(), color_counts.float(), n.float()[:, None], mean_x[:, None], mean_y[:, None]], 1
    )


def save_feature_net(net: ShapesFeatureNet, path: str | Path) -> None:
    """Write the weights (and `num_features` in the metadata) as safetensors."""
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"num_features": str(net.num_features)})


def load_feature_net(path: str | Path | None = None, device: torch.device | str = "cpu") -> ShapesFeatureNet:
    """The trained extractor (default: the shipped weights), in eval mode with gradients off."""
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"Shapes feature weights not found at {path}; train them with scripts/train_shapes_features.py"
        )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        num_features = int((handle.metadata() or {}).get("num_features", 64))
    net = ShapesFeatureNet(num_features)
    net.load_state_dict(load_file(str(path)))
    net.eval().requires_grad_(False)
    return net.to(device)


@torch.no_grad()
def extract_features(images: Tensor, net: ShapesFeatureNet | None = None, batch_size: int = 256) -> Tensor:
    """[B, num_features] features of `images` ([B, 3, H, W], uint8 or float in [0, 1])."""
    net = net if net is not None else load_feature_net()
    device = next(net.parameters()).device
    parts = [net(images[i : i + batch_size].to(device)).cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, net.num_features)
