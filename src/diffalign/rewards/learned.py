"""A learned reward model for the Shapes world: a small prompt-conditioned image scorer.

Architecture (`RewardNet`):
- **prompt encoder**: a word-level vocabulary built from the training prompts (`PromptVocab`, with an
  `<unk>` token so prompts nobody named still score), token embeddings plus learned positional
  embeddings (so word order matters: "a circle left of a square" is not "a square left of a circle"),
  a small transformer encoder and attention pooling into one prompt vector;
- **image encoder**: a conv net on the image resized to `image_size` (input in [0, 1], mapped to
  [-1, 1], plus two coordinate channels so positions are explicit); every stage is modulated by the
  prompt vector with FiLM (Perez et al. 2018), so the prompt chooses which colours and shapes the
  features look for; the last feature map is flattened, which keeps where things are;
- **head**: an MLP on (image features, prompt vector) to one scalar. With rater conditioning
  (pluralistic preferences) a learned embedding per rater group, plus a "pooled" entry for
  unknown/None groups, modulates the head: the embedding is the group's correction to the output
  layer's weights and bias, r_g = (w + u_g) . h + b + c_g, so the groups share every feature and
  differ in how they weigh them (one model learns each group's taste). The embeddings start at zero,
  i.e. every group starts at the pooled reward; a gated (multiplicative) modulation would start at a
  saddle where groups with opposite tastes get no gradient apart.

The scalar is a Bradley–Terry utility: P(A preferred to B) = sigmoid(r(A) - r(B)), trained with the
soft-label cross-entropy that PickScore uses (see `bt_training`). `LearnedReward` wraps the net as a
`Reward` (differentiable: gradients reach the pixels) with `save(dir)`/`load(dir)`: config.json,
vocab.json and model.safetensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffalign.rewards.protocol import check_images

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
POOLED = "<pooled>"
CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE = "config.json", "vocab.json", "model.safetensors"
FORMAT = "diffalign-learned-reward/1"


@dataclass
class RewardModelConfig:
    """Shape of a `RewardNet`.

    Attributes:
        image_size: images are resized (bilinear) to image_size x image_size before scoring.
        channels: output channels of the conv stages; each stage halves the resolution, so the last
            feature map is image_size / 2**len(channels) on a side.
        convs_per_stage: 3x3 convolutions per stage (the first one carries the FiLM modulation).
        text_dim: width of the token embeddings, the transformer and the pooled prompt vector.
        text_layers: transformer encoder layers over the prompt's tokens (0: embeddings only).
        text_heads: attention heads of the transformer and of the attention pooling.
        max_words: prompts are cut to this many words (plus a leading <cls> token).
        hidden: width of the head's hidden layer.
        groups: the rater groups the model knows (empty: no rater conditioning). Index 0 of the group
            table is always the pooled entry, used for None and for groups not listed here.
    """

    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)
    convs_per_stage: int = 1
    text_dim: int = 64
    text_layers: int = 1
    text_heads: int = 4
    max_words: int = 16
    hidden: int = 128
    groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.groups = [str(g) for g in self.groups]
        if self.image_size < 2 ** len(self.channels):
            raise ValueError(
                f"image_size {self.image_size} is too small for {len(self.channels)} halving stages"
            )
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim {self.text_dim} must be divisible by text_heads {self.text_heads}")
        if len(set(self.groups)) != len(self.groups) or POOLED in self.groups:
            raise ValueError(f"groups must be distinct and not {POOLED!r}, got {self.groups}")

    @property
    def rater_conditioned(self) -> bool:
        return bool(self.groups)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> RewardModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RewardModelConfig field(s) {sorted(unknown)}")
        return cls(**data)


# How prompts split into words: "unicode" takes runs of any letters and digits ("café", "猫"); "ascii",
# the rule of the first models, only a-z and 0-9, which dropped every other letter (a prompt in Chinese
# had no words at all). The two agree on ASCII text; a saved model records its rule (ascii if absent).
WORD_PATTERNS = {"unicode": re.compile(r"[^\W_]+"), "ascii": re.compile(r"[a-z0-9]+")}


class PromptVocab:
    """Word-level vocabulary: `<pad>`, `<unk>`, `<cls>`, then the words of the training prompts.

    Words are lower-case runs of letters and digits (`WORD_PATTERNS`); a word outside the vocabulary
    maps to `<unk>`, so the reward still scores prompts it never saw (they just carry less information).
    """

    def __init__(self, words: Sequence[str], word_pattern: str = "unicode") -> None:
        self.words = list(words)
        if self.words[:3] != [PAD, UNK, CLS]:
            raise ValueError(f"a vocabulary must start with {PAD!r}, {UNK!r}, {CLS!r}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("vocabulary words must be distinct")
        if word_pattern not in WORD_PATTERNS:
            raise ValueError(f"word_pattern must be one of {sorted(WORD_PATTERNS)}, got {word_pattern!r}")
        self.word_pattern = word_pattern
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def split(self, prompt: str) -> list[str]:
        return WORD_PATTERNS[self.word_pattern].findall(prompt.lower())

    @classmethod
    def build(cls, prompts: Iterable[str], word_pattern: str = "unicode") -> PromptVocab:
        """The vocabulary of `prompts` (words sorted, so the same prompts give the same ids)."""
        pattern = WORD_PATTERNS[word_pattern]
        seen = sorted({w for p in prompts for w in pattern.findall(p.lower())})
        return cls([PAD, UNK, CLS, *seen], word_pattern)

    def encode(self, prompts: Sequence[str], max_words: int) -> tuple[Tensor, Tensor]:
        """Token ids [B, 1 + max_words] (a leading <cls>) and a mask (True = a real token)."""
        ids = torch.zeros((len(prompts), max_words + 1), dtype=torch.long)
        ids[:, 0] = self.index[CLS]
        unk = self.index[UNK]
        for i, prompt in enumerate(prompts):
            toks = [self.index.get(w, unk) for w in self.split(prompt)[:max_words]]
            if toks:
                ids[i, 1 : 1 + len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids, ids != self.index[PAD]


class PromptEncoder(nn.Module):
    """Embeddings + positions -> transformer encoder -> attention pooling to one vector [B, D]."""

    def __init__(self, vocab_size: int, config: RewardModelConfig) -> None:
        super().__init__()
        d = config.text_dim
        self.embed = nn.Embedding(vocab_size, d)
        self.position = nn.Parameter(torch.zeros(config.max_words + 1, d))
        nn.init.normal_(self.position, std=0.02)
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    d,
                    config.text_heads,
                    dim_feedforward=2 * d,
                    dropout=0.0,
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(config.text_layers)
            ]
        )
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pool = nn.MultiheadAttention(d, config.text_heads, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)
        q = self.query.expand(ids.shape[0], -1, -1)
        pooled, _ = self.pool(q, x, x, key_padding_mask=~mask, need_weights=False)
        return self.norm(pooled[:, 0] + x[:, 0])


class FiLMStage(nn.Module):
    """conv3x3 -> GroupNorm -> FiLM(prompt) -> SiLU [-> more conv3x3 + SiLU] -> 2x2 average pool."""

    def __init__(self, c_in: int, c_out: int, text_dim: int, convs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, c_out), c_out)
        self.film = nn.Linear(text_dim, 2 * c_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.extra = nn.ModuleList([nn.Conv2d(c_out, c_out, 3, padding=1) for _ in range(convs - 1)])

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        gamma, beta = self.film(text).chunk(2, dim=-1)
        h = self.norm(self.conv(x)) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        h = F.silu(h)
        for conv in self.extra:
            h = F.silu(conv(h))
        return F.avg_pool2d(h, 2)


class RewardNet(nn.Module):
    """The scorer: (images [B,3,S,S] in [0,1], token ids, mask, group ids) -> rewards [B]."""

    def __init__(self, config: RewardModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.text = PromptEncoder(vocab_size, config)
        stages, c_in = [], 5  # RGB + (x, y) coordinate channels
        for c in config.channels:
            stages.append(FiLMStage(c_in, c, config.text_dim, config.convs_per_stage))
            c_in = c
        self.stages = nn.ModuleList(stages)
        side = config.image_size // 2 ** len(config.channels)
        self.image_proj = nn.Linear(c_in * side * side, config.hidden)
        self.fuse = nn.Linear(config.hidden + config.text_dim, config.hidden)
        self.out = nn.Linear(config.hidden, 1)
        if config.groups:
            # Row g holds group g's correction to the head's output weights (hidden entries) and bias
            # (last entry); row 0 is the pooled entry. Zero at the start: every group starts pooled.
            self.group_embed = nn.Embedding(len(config.groups) + 1, config.hidden + 1)
            nn.init.zeros_(self.group_embed.weight)
        coords = torch.linspace(-1.0, 1.0, config.image_size)
        self.register_buffer(
            "coords",
            torch.stack(
                [
                    coords.view(1, -1).expand(config.image_size, -1),
                    coords.view(-1, 1).expand(-1, config.image_size),
                ]
            ),
            persistent=False,
        )

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The prompt encoder's and the conv stages' parameters (FiLM included): everything but the
        head (`image_proj`, `fuse`, `out` and the group table)."""
        return [*self.text.parameters(), *self.stages.parameters()]

    def forward(self, images: Tensor, ids: Tensor, mask: Tensor, group_ids: Tensor | None = None) -> Tensor:
        text = self.text(ids, mask)
        x = images * 2 - 1
        x = torch.cat([x, self.coords.unsqueeze(0).expand(x.shape[0], -1, -1, -1)], dim=1)
        for stage in self.stages:
            x = stage(x, text)
        h = F.silu(self.image_proj(x.flatten(1)))
        h = F.silu(self.fuse(torch.cat([h, text], dim=-1)))
        r = self.out(h)[:, 0]
        if self.config.groups:
            if group_ids is None:
                group_ids = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            g = self.group_embed(group_ids)
            r = r + (h * g[:, :-1]).sum(-1) + g[:, -1]
        return r


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class LearnedReward:
    """A trained `RewardNet` as a `Reward`: `(images in [0,1], prompts, group=None) -> Tensor[B]`.

    `group` is None (the pooled reward), one group name for the whole batch, or one name (or None) per
    image; groups the model does not know fall back to the pooled entry. Gradients flow to `images`.
    """

    differentiable = True

    def __init__(
        self, net: RewardNet, vocab: PromptVocab, name: str = "learned", device: torch.device | str = "cpu"
    ) -> None:
        self.net = net.to(device)
        self.vocab = vocab
        self.name = name
        self.device = torch.device(device)

    @property
    def config(self) -> RewardModelConfig:
        return self.net.config

    @property
    def groups(self) -> list[str]:
        return list(self.config.groups)

    def group_ids(self, group: str | Sequence[str | None] | None, batch: int) -> Tensor | None:
        """Indices into the group table (0 = pooled), or None for a model without groups."""
        if not self.config.groups:
            return None
        names = [group] * batch if group is None or isinstance(group, str) else list(group)
        if len(names) != batch:
            raise ValueError(f"reward {self.name!r}: {batch} images but {len(names)} groups")
        lookup = {g: i + 1 for i, g in enumerate(self.config.groups)}
        return torch.tensor([lookup.get(g, 0) if g is not None else 0 for g in names], device=self.device)

    def forward(self, images: Tensor, prompts: Sequence[str], group_ids: Tensor | None = None) -> Tensor:
        """Raw scores of float images [B,3,H,W] in [0,1] (no checks; used by training)."""
        ids, mask = self.vocab.encode(list(prompts), self.config.max_words)
        x = _resize(images.to(self.device, torch.float32), self.config.image_size)
        return self.net(x, ids.to(self.device), mask.to(self.device), group_ids)

    def __call__(
        self, images: Tensor, prompts: Sequence[str], group: str | Sequence[str | None] | None = None
    ) -> Tensor:
        check_images(images, prompts, self.name)
        out = self.forward(images, prompts, self.group_ids(group, images.shape[0]))
        return out.to(images.device)

    def to(self, device: torch.device | str) -> LearnedReward:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def eval(self) -> LearnedReward:
        self.net.eval()
        return self

    def train(self, mode: bool = True) -> LearnedReward:
        self.net.train(mode)
        return self

    def parameters(self):
        return self.net.parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def save(self, directory: str | Path) -> Path:
        """Write config.json, vocab.json and model.safetensors into `directory` (created)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(
            json.dumps(
                {
                    "format": FORMAT,
                    "name": self.name,
                    "model": self.config.to_dict(),
                    "word_pattern": self.vocab.word_pattern,
                },
                indent=1,
            ),
            encoding="utf-8",
        )
        (out / VOCAB_FILE).write_text(json.dumps(self.vocab.words), encoding="utf-8")
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        return out

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> LearnedReward:
        """Read a folder written by `save`; errors name the folder and the missing or bad file."""
        folder = Path(directory)
        if not folder.is_dir():
            raise FileNotFoundError(f"reward model folder {str(folder)!r} does not exist")
        for fname in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE):
            if not (folder / fname).is_file():
                raise FileNotFoundError(
                    f"reward model folder {str(folder)!r} has no {fname}; expected {CONFIG_FILE}, "
                    f"{VOCAB_FILE} and {WEIGHTS_FILE} (written by LearnedReward.save)"
                )
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            config = RewardModelConfig.from_dict(meta["model"])
            words = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
            vocab = PromptVocab(words, str(meta.get("word_pattern", "ascii")))  # ascii: saved before the rule
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"reward model folder {str(folder)!r}: bad {CONFIG_FILE} or {VOCAB_FILE}: {err}"
            ) from err
        net = RewardNet(config, len(vocab))
        try:
            net.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        except SafetensorError as err:
            raise ValueError(
                f"reward model folder {str(folder)!r}: {WEIGHTS_FILE} is not readable: {err}"
            ) from err
        except (RuntimeError, OSError) as err:
            raise ValueError(
                f"reward model folder {str(folder)!r}: {WEIGHTS_FILE} does not match {CONFIG_FILE}: {err}"
            ) from err
        return cls(net, vocab, name=str(meta.get("name", "learned")), device=device).eval()


def build_reward_model(
    prompts: Iterable[str], config: RewardModelConfig | None = None, seed: int = 0, name: str = "learned"
) -> LearnedReward:
    """A freshly initialised reward model whose vocabulary comes from `prompts` (seeded init)."""
    config = config or RewardModelConfig()
    vocab = PromptVocab.build(prompts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RewardNet(config, len(vocab))
    return LearnedReward(net, vocab, name=name)
