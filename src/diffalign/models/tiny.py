"""The tiny Shapes-world models behind the `DiffusionModel` interface.

`TinyDiffusionModel` wraps a `TinyUNet`, its tokenizer and its noise schedule. Images live in pixel
space scaled to [-1, 1] (`encode`/`decode` are that affine map). The conditioning holds token ids
and masks, and the text encoder runs inside `predict`, so a trajectory's conditioning stays valid
when the text encoder's weights change during fine-tuning.

The reference (frozen base) prediction comes from one of two places:
- full fine-tuning: a frozen copy of the network, made on the first call (a tiny model is a few MB);
- LoRA (`enable_lora`): the same network with its adapters disabled, so no second copy exists.

A model folder holds `config.json` + `diffusion_pytorch_model.safetensors` (diffusers'
`save_pretrained` of the UNet), `tokenizer.json` and `diffalign_model.json` (prediction type and
schedule).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from diffalign.diffusion.protocol import Conditioning
from diffalign.diffusion.schedules import DDPMSchedule, FlowSchedule
from diffalign.models.reference import FrozenReference
from diffalign.models.tiny_unet import TinyUNet
from diffalign.models.tokenizer import ShapesTokenizer

MODEL_FILE = "diffalign_model.json"
TOKENIZER_FILE = "tokenizer.json"

#: Architectures compared in docs/models.md; "base" is the one the shipped models use.
ARCHITECTURES: dict[str, dict] = {
    "unet-xs": dict(block_channels=(16, 32, 64), layers_per_block=1, attention_resolutions=(2,), text_dim=64),
    "unet-s": dict(block_channels=(24, 48, 96), layers_per_block=1, attention_resolutions=(2,), text_dim=64),
    "unet-m": dict(
        block_channels=(32, 64, 128), layers_per_block=1, attention_resolutions=(2,), text_dim=128
    ),
}


class TinyDiffusionModel(FrozenReference):
    """A `DiffusionModel` for the Shapes world (see the module doc)."""

    def __init__(
        self,
        unet: TinyUNet,
        tokenizer: ShapesTokenizer,
        prediction_type: str,
        schedule: DDPMSchedule | FlowSchedule,
        eps_skip: bool = False,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "flow"):
            raise ValueError(
                f"prediction_type must be epsilon, v_prediction or flow, got {prediction_type!r}"
            )
        if (prediction_type == "flow") != isinstance(schedule, FlowSchedule):
            raise ValueError(
                f"prediction_type {prediction_type!r} does not match schedule {type(schedule).__name__}"
            )
        self.unet = unet
        self.tokenizer = tokenizer
        self.prediction_type = prediction_type
        self._schedule = schedule
        size = unet.config.sample_size
        self.latent_shape = (unet.config.in_channels, size, size)
        self._reference: TinyUNet | None = None
        self.lora = False
        self.eps_skip = eps_skip and prediction_type == "epsilon"

    # --- construction and files ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        prediction_type: str = "epsilon",
        architecture: str | dict = "unet-s",
        sample_size: int = 32,
        schedule: DDPMSchedule | FlowSchedule | None = None,
    ) -> TinyDiffusionModel:
        """A freshly initialised model of a named (or explicit) architecture."""
        tokenizer = ShapesTokenizer()
        arch = ARCHITECTURES[architecture] if isinstance(architecture, str) else dict(architecture)
        unet = TinyUNet(
            sample_size=sample_size, vocab_size=len(tokenizer), max_length=tokenizer.max_length, **arch
        )
        if schedule is None:
            schedule = FlowSchedule() if prediction_type == "flow" else DDPMSchedule()
        return cls(unet, tokenizer, prediction_type, schedule, eps_skip=prediction_type == "epsilon")

    def save(self, directory: str | Path) -> None:
        """Write the model folder (see module doc). With LoRA enabled, the adapters are merged first
        into a copy, so the folder is a plain full model; use `save_lora` for the adapters alone."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        unet = _merged(copy.deepcopy(self.unet)) if self.lora else self.unet
        unet.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save(out / TOKENIZER_FILE)
        schedule = {"type": type(self._schedule).__name__, **_schedule_fields(self._schedule)}
        (out / MODEL_FILE).write_text(
            json.dumps(
                {
                    "kind": "tiny",
                    "prediction_type": self.prediction_type,
                    "eps_skip": self.eps_skip,
                    "schedule": schedule,
                },
                indent=1,
            )
        )

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> TinyDiffusionModel:
        """Load a model folder written by `save` (weights are cast to float32)."""
        folder = Path(directory)
        info_path = folder / MODEL_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{folder}: not a diffalign tiny-model folder (no {MODEL_FILE})")
        for name in ("config.json", "diffusion_pytorch_model.safetensors", TOKENIZER_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: the tiny-model folder has no {name}")
        info = _read_json(info_path)
        try:
            sched = dict(info["schedule"])
            kind = sched.pop("type")
            prediction_type = info["prediction_type"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{info_path}: no schedule type or prediction_type ({error!r})") from error
        schedules = {"FlowSchedule": FlowSchedule, "DDPMSchedule": DDPMSchedule}
        if kind not in schedules:
            raise ValueError(
                f"{info_path}: unknown schedule type {kind!r}; expected one of {sorted(schedules)}"
            )
        try:
            schedule = schedules[kind](**sched)
        except TypeError as error:
            raise ValueError(f"{info_path}: bad {kind} fields {sorted(sched)}: {error}") from error
        unet = TinyUNet.from_pretrained(folder, torch_dtype=torch.float32).to(
            device, memory_format=torch.channels_last
        )
        tokenizer = ShapesTokenizer.load(folder / TOKENIZER_FILE)
        return cls(unet, tokenizer, prediction_type, schedule, eps_skip=info.get("eps_skip", False))

    # --- the DiffusionModel interface ------------------------------------------------------------

    @property
    def schedule(self) -> DDPMSchedule | FlowSchedule:
        return self._schedule

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the images `encode` takes: the latent shape, as this model works in pixels."""
        return tuple(self.latent_shape)

    def to(self, device: torch.device | str) -> TinyDiffusionModel:
        self.unet.to(device)
        if self._reference is not None:
            self._reference.to(device)
        return self

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        ids, mask = self.tokenizer(list(prompts), device=self.device)
        return Conditioning({"input_ids": ids, "attention_mask": mask})

    def network_time(self, t: Tensor) -> Tensor:
        """Schedule time -> the network's timestep input in [0, 1000] (flow t in [0,1] times 1000)."""
        t = t.to(self.device, torch.float32)
        return t * 1000.0 if self.prediction_type == "flow" else t

    def forward_network(
        self, unet: nn.Module, x_t: Tensor, t: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """The model's prediction from the network `unet` (the model's own, a copy, or with adapters).

        With `eps_skip`, an epsilon model predicts through a skip connection,
        eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) F(x_t, t), the c_skip / c_out preconditioning of
        Karras et al. (2022, EDM) written for noise prediction: where the signal vanishes (abar -> 0)
        eps = x_t holds exactly instead of having to be learnt to high precision, which otherwise
        makes few-step DDIM sampling of a small, briefly trained model diverge. The output is still
        the noise, trained with the plain epsilon loss.
        """
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        # channels_last runs the convolutions about 1.3x faster on CPU (docs/models.md).
        x_in = x_t.contiguous(memory_format=torch.channels_last)
        out = unet(x_in, self.network_time(t), input_ids, attention_mask).contiguous()
        if self.eps_skip:
            abar = self.schedule.alpha_bar(t.to(x_t.device)).float().view(-1, *([1] * (x_t.ndim - 1)))
            out = (1 - abar).sqrt() * x_t.float() + abar.sqrt() * out.float()
        return out

    @property
    def denoiser(self) -> nn.Module:
        """The trained network (the protocol's name for it; `unet` here)."""
        return self.unet

    def call_network(self, unet: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The prediction of `unet` (this model's network or its frozen reference copy)."""
        return self._call(unet, x_t, t, cond)

    def _call(self, unet: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.forward_network(unet, x_t, t, cond.tensors["input_ids"], cond.tensors["attention_mask"])

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self._call(self.unet, x_t, t, cond)

    def encode(self, images: Tensor) -> Tensor:
        return images.to(self.device) * 2.0 - 1.0

    def decode(self, latents: Tensor) -> Tensor:
        return (latents + 1.0) / 2.0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    # --- LoRA --------------------------------------------------------------------------------------

    def enable_lora(
        self, rank: int = 8, alpha: float | None = None, target_modules: Sequence[str] | None = None
    ) -> None:
        """Add LoRA adapters (peft) and freeze the base weights; the reference is the adapters off."""
        from peft import LoraConfig

        targets = list(target_modules or ["to_q", "to_k", "to_v", "to_out", "conv1", "conv2"])
        self.unet.requires_grad_(False)
        self.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)
        )
        self.lora = True
        self._reference = None

    def merge_lora(self) -> None:
        """Fold the adapters into the weights (W + alpha/r B A) and drop them: a plain full model
        again, every weight trainable, its reference the merged model (made on first use)."""
        if not self.lora:
            raise ValueError("merge_lora: this model has no LoRA adapters")
        self.unet = _merged(self.unet).requires_grad_(True)
        self.lora = False
        self._reference = None

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()


def _schedule_fields(schedule: DDPMSchedule | FlowSchedule) -> dict:
    fields = asdict(schedule) if hasattr(schedule, "__dataclass_fields__") else dict(vars(schedule))
    return {k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool))}


def _merged(unet: TinyUNet) -> TinyUNet:
    """`unet` with its LoRA adapters merged into the base layers and the peft layers removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return _strip_lora(unet)


def _strip_lora(unet: TinyUNet) -> TinyUNet:
    """Replace merged peft layers by their base layers (a plain TinyUNet again)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    unet._hf_peft_config_loaded = False
    if hasattr(unet, "peft_config"):
        del unet.peft_config  # peft would warn of "multiple adapters" when LoRA is added again
    return unet


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; a ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
