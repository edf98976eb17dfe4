"""Simulated rater panels from files: raters with tastes nobody built in.

The Shapes world's default panel (`diffalign.world.raters.PanelConfig()`: two equal groups, `bold` and
`calm`) is one choice of raters. A panel file describes another, in YAML (or JSON), with the fields of
`PanelConfig`; anything left out keeps its default::

    # panel.yaml: three groups, noisier raters
    groups:
      - {name: minimalist, taste: {size: -1.0, centrality: 0.5}, share: 0.5}
      - {name: maximalist, taste: {size: 1.0, warmth: 1.0}, share: 0.3}
      - {name: indifferent, taste: {}, share: 0.2}
    n_raters: 30
    temperature: 0.06
    quality_weight: 0.8

It is read by `load_panel`, with the errors of `diffalign.align.config_io` (file, line, key, the nearest
known key). Commands take it as `--panel FILE` (`diffalign prefs simulate`, the win-rate judge of
`diffalign eval`), and the gold rewards as a suffix: `shapes:utility@panel.yaml`,
`shapes:rater-minimalist@panel.yaml`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from diffalign.world.raters import PanelConfig, RaterPanel


def load_panel_config(path: str | Path) -> PanelConfig:
    """The `PanelConfig` of a panel file (module doc); `ConfigError` names the file, line and key."""
    from diffalign.align.config_io import load_config

    return load_config(PanelConfig, path)


def load_panel(path: str | Path | None) -> RaterPanel:
    """The rater panel of a panel file, or the default panel for None."""
    return RaterPanel(load_panel_config(path) if path is not None else None)


def panel_fingerprint(panel: RaterPanel) -> str:
    """A short hash of everything that decides the panel's choices (its whole config), so that labels
    from different panels are never taken for one another."""
    text = json.dumps(dataclasses.asdict(panel.config), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


__all__ = ["load_panel", "load_panel_config", "panel_fingerprint"]
