"""Diffusers pipelines (Stable Diffusion 1.x/2.x, XL, 3) behind the `DiffusionModel` protocol.

`load_adapter(folder)` picks the adapter from the folder's model_index.json; `AdapterConfig` holds the
memory and precision options. See docs/diffusers.md.
"""

from diffalign.models.diffusers_adapters.common import AdapterConfig, DamagedPipelineError, DiffusersAdapter
from diffalign.models.diffusers_adapters.loading import ADAPTERS, UnsupportedPipelineError, load_adapter
from diffalign.models.diffusers_adapters.sd import StableDiffusionAdapter
from diffalign.models.diffusers_adapters.sd3 import StableDiffusion3Adapter
from diffalign.models.diffusers_adapters.sdxl import StableDiffusionXLAdapter

__all__ = [
    "ADAPTERS",
    "AdapterConfig",
    "DamagedPipelineError",
    "DiffusersAdapter",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "UnsupportedPipelineError",
    "load_adapter",
]
