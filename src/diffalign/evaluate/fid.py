"""Distance of a sample set to the data distribution: FID and KID through torchmetrics.

- FID (Heusel et al. 2017): ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) between Gaussians fitted
  to the two sets' features. Biased for small sets (it grows as the sample size shrinks), so compare
  FIDs only at equal sizes.
- KID (Binkowski et al. 2018): the unbiased squared MMD with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over `kid_subsets` random subsets of `kid_subset_size`; unbiased,
  so usable at small sizes, reported as mean and standard deviation over subsets.

`fid_kid` uses the Shapes feature extractor (`features.ShapesFeatureNet`, trained on the world) by
default, suited to 32x32 Shapes images. `inception_fid` computes the standard Inception-v3 FID for real
(photographic) images; it needs the `torch-fidelity` package and the FID Inception weights file on disk
(`pt_inception-2015-12-05-6726825d.pth`) and never downloads anything.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from diffalign.evaluate.features import extract_features, load_feature_net


class _Precomputed(nn.Identity):
    """Passes already-extracted [B, F] features through torchmetrics (so each image is featurised once
    for both FID and KID)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def _check_images(images: Tensor, arg: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{arg}: expected [B, 3, H, W] images, got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"{arg}: FID/KID need at least two images, got {images.shape[0]}")
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise ValueError(f"{arg}: expected uint8 images or float images in [0, 1], got {images.dtype}")
    if images.dtype != torch.uint8 and not bool(((images >= 0) & (images <= 1)).all()):
        raise ValueError(f"{arg}: float images must lie in [0, 1] (NaN is refused too)")


def _check_sizes(real: Tensor, fake: Tensor) -> None:
    """The Shapes features are not scale-invariant: sets of other image sizes are not comparable."""
    if real.shape[2:] != fake.shape[2:]:
        raise ValueError(
            f"real images are {tuple(real.shape[2:])} pixels and fake images {tuple(fake.shape[2:])}; "
            "FID/KID in the Shapes feature space compare images of one size"
        )


def _feed(metric, images: Tensor, real: bool, batch_size: int) -> None:
    for i in range(0, images.shape[0], batch_size):
        metric.update(images[i : i + batch_size].detach().cpu(), real=real)


@torch.no_grad()
def fid_kid(
    real: Tensor,
    fake: Tensor,
    feature_net: nn.Module | None = None,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID of `fake` against `real` ([B, 3, H, W], uint8 or float in [0, 1]).

    Args:
        real: reference images (e.g. rendered scenes of the same prompts).
        fake: model samples.
        feature_net: a module mapping images to [B, F] features (default: the shipped Shapes
            extractor, `features.load_feature_net`).
        kid_subset_size: KID subset size (default: half the smaller set, at most 1000, so that subsets
            differ and kid_std means something).
        kid_subsets: KID subsets.
        batch_size: images per feature pass.
        seed: seeds KID's subset draws (torch's global RNG is restored afterwards).

    Returns:
        {"fid", "kid_mean", "kid_std", "n_real", "n_fake"}. KID's scale depends on the feature space
        (its kernel is not normalised), so compare KIDs computed with the same extractor only.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_images(real, "real")
    _check_images(fake, "fake")
    _check_sizes(real, fake)
    net = feature_net if feature_net is not None else load_feature_net()
    size = min(real.shape[0], fake.shape[0])
    subset = kid_subset_size if kid_subset_size is not None else min(max(size // 2, 2), 1000)
    if not 2 <= subset <= size:
        raise ValueError(f"kid_subset_size must be in [2, {size}] (the smaller set's size), got {subset}")
    real_features = extract_features(real, net, batch_size)
    fake_features = extract_features(fake, net, batch_size)
    table = _Precomputed(real_features.shape[1])
    fid = FrechetInceptionDistance(feature=table)
    with warnings.catch_warnings():  # its "saves all features in a buffer" notice: we pass features
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=table, subsets=kid_subsets, subset_size=subset)
    for metric in (fid, kid):
        metric.update(real_features, real=True)
        metric.update(fake_features, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
    }


@torch.no_grad()
def inception_fid(real: Tensor, fake: Tensor, weights_path: str | Path, batch_size: int = 64) -> float:
    """The standard Inception-v3 FID (2048-d pool features) of `fake` against `real`.

    Raises:
        FileNotFoundError: `weights_path` (the FID Inception weights) is not a file.
        ImportError: the `torch-fidelity` package, which holds the Inception network, is missing.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception FID weights not found at {path} (pt_inception-2015-12-05-6726825d.pth); "
            "put the file there, nothing is downloaded"
        )
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Inception FID needs the torch-fidelity package: pip install torch-fidelity"
        ) from err
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_images(real, "real")
    _check_images(fake, "fake")
    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))
    to_float = lambda x: x.float() / 255 if x.dtype == torch.uint8 else x.float()  # noqa: E731
    _feed(fid, to_float(real), True, batch_size)
    _feed(fid, to_float(fake), False, batch_size)
    return float(fid.compute())
