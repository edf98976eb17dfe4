"""The classifier-free guidance scale (Ho & Salimans 2022) diffalign samples with unless told otherwise.

One value for every command, trainer config and evaluation, so that they cannot drift apart: a run
trained with the default is judged with it. 3 is the scale the shipped tiny models are evaluated at
(ShapesEval, docs/models.md). `diffusion.SamplerConfig` itself defaults to 1 (no guidance), the plain
sampler; this module imports nothing, so the command line can name the default without loading torch.
"""

DEFAULT_GUIDANCE_SCALE = 3.0
