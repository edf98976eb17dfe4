"""Pre-training data for ReFL's regulariser: (image, prompt) examples the model's own training loss is
kept low on while the reward is maximised (Xu et al. 2023, ImageReward, Alg. 1, which uses the
pre-training set; here a stand-in for it).

Two sources (`BackpropConfig.pretrain_data`):
- "world": scenes drawn by the Shapes world's renderer with their prompts, the tiny models' own
  training data (generated on the fly);
- a preference store (a file path or a SQLAlchemy URL): the preferred image of every non-tie pair with
  its prompt (as SPIN's real examples; for Pick-a-Pic, its winners), read at the model's image size.
  Only references are held; each step reads the images it draws (`StoredImages`).

A draw is a function of the generator it is given, so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

WORLD = "world"


class WorldData:
    """Rendered Shapes-world scenes of `image_size` pixels with their prompts."""

    def __init__(self, image_size: int) -> None:
        from diffalign.world.dataset import DatasetConfig, ShapesGenerator

        self.world = ShapesGenerator(DatasetConfig(canvas_size=image_size))
        self.source = WORLD

    def draw(self, count: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """(images float [count, 3, S, S] in [0, 1], prompts)."""
        batch = self.world.sample(count, generator)
        return batch.images, list(batch.prompts)


class StoreData:
    """The preferred images of a preference store's pairs, at `image_size` pixels, drawn uniformly.

    Raises:
        FileNotFoundError: no store at a file path.
        PreferenceDataError: the store cannot be read or has no non-tie pair (names the store).
    """

    def __init__(self, store: str, image_size: int) -> None:
        from diffalign.align.dpo import PreferenceDataError
        from diffalign.align.spin import preferred_images
        from diffalign.prefs.store import PreferenceStore, StoreError

        if "://" not in store and not Path(store).is_file():
            raise FileNotFoundError(f"pretrain_data={store!r}: no such preference store (or 'world')")
        try:
            pairs = PreferenceStore.open(store, create=False).pair_references(
                size=image_size, include_ties=False
            )
        except StoreError as err:
            raise PreferenceDataError(f"pretrain_data={store!r}: {err}") from err
        self.prompts, hashes = preferred_images(pairs, source=f"pretrain_data={store}")
        self.images = pairs.column(hashes)
        self.source = f"store:{store}"

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, count: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """(images float [count, 3, S, S] in [0, 1], prompts), drawn with replacement."""
        index = torch.randint(len(self.prompts), (count,), generator=generator)
        images = self.images[index].float() / 255.0
        return images, [self.prompts[i] for i in index.tolist()]


def pretrain_source(spec: str, image_size: int) -> WorldData | StoreData:
    """The pre-training data named by `spec` ("world" or a preference store) at `image_size` pixels."""
    return WorldData(image_size) if spec == WORLD else StoreData(spec, image_size)


__all__ = ["WORLD", "StoreData", "WorldData", "pretrain_source"]
