"""Benchmark of the tiny models on this machine: sampling throughput and training step time.

    python benchmarks/sampling.py [--threads 2] [--batch 64]

Measures, in one run:
- denoiser forward time per image for each architecture, with the channels_last memory format the
  models use against the plain contiguous format (the baseline);
- sampling throughput (images/s) of the shipped models for every sampler and step count, with
  classifier-free guidance (two network passes per step) and without, relative to DDIM with 20
  steps and guidance (the default of `diffalign eval`);
- the training step time (forward, backward, AdamW) of each architecture at the given batch.
Prints markdown tables (docs/models.md and the README quote them).
"""

from __future__ import annotations

import argparse
import time

import torch

from diffalign.diffusion import SamplerConfig, sample
from diffalign.models.registry import load_model
from diffalign.models.tiny import ARCHITECTURES, TinyDiffusionModel


def _time(fn, *args, repeat: int = 3) -> float:
    """Seconds per call of fn(*args), after one warm-up call."""
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - start) / repeat


def _train_step(model: TinyDiffusionModel, opt: torch.optim.Optimizer, x, t, cond) -> None:
    loss = model.predict(x, t, cond).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def forward_table(batch: int) -> None:
    print("## Denoiser forward pass (ms per image)\n")
    print("| architecture | parameters | contiguous (baseline) | channels_last | speed-up |")
    print("|---|---|---|---|---|")
    for name in ARCHITECTURES:
        model = TinyDiffusionModel.create("epsilon", name)
        model.unet.eval()
        x = torch.randn(batch, 3, 32, 32)
        t = torch.full((batch,), 500.0)
        cond = model.encode_prompts(["a red circle left of a square"] * batch)
        ids, mask = cond.tensors["input_ids"], cond.tensors["attention_mask"]
        n_params = sum(p.numel() for p in model.unet.parameters())
        with torch.no_grad():
            model.unet.to(memory_format=torch.contiguous_format)
            plain = _time(model.unet, x, t, ids, mask) / batch * 1000
            model.unet.to(memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            fast = _time(model.unet, x_cl, t, ids, mask) / batch * 1000
        print(f"| {name} | {n_params / 1e6:.2f}M | {plain:.2f} | {fast:.2f} | {plain / fast:.2f}x |")


def sampling_table(batch: int) -> None:
    print("\n## Sampling throughput of the shipped models (images/s)\n")
    prompts = ["a red circle left of a square"] * batch
    rows = []
    for name, samplers in (("base", ("ddim", "ddpm")), ("base-flow", ("flow_euler", "flow_sde"))):
        model = load_model(name)
        with torch.no_grad():  # warm-up
            sample(model, prompts[:4], config=SamplerConfig(sampler=samplers[0], num_steps=2))
        for sampler in samplers:
            for steps, guidance in ((10, 3.0), (20, 3.0), (50, 3.0), (20, 1.0)):
                config = SamplerConfig(sampler=sampler, num_steps=steps, guidance_scale=guidance, eta=0.0)
                start = time.perf_counter()
                with torch.no_grad():
                    sample(model, prompts, config=config)
                rows.append((name, sampler, steps, guidance, batch / (time.perf_counter() - start)))
    baseline = next(r[4] for r in rows if r[0] == "base" and r[1] == "ddim" and r[2] == 20 and r[3] == 3.0)
    print("| model | sampler | steps | guidance | images/s | vs DDIM-20 guided |\n|---|---|---|---|---|---|")
    for name, sampler, steps, guidance, rate in rows:
        print(f"| {name} | {sampler} | {steps} | {guidance:g} | {rate:.1f} | {rate / baseline:.2f}x |")


def training_table(batch: int) -> None:
    print(f"\n## Training step (forward + backward + AdamW, batch {batch})\n")
    print("| architecture | seconds per step | images/s |\n|---|---|---|")
    for name in ARCHITECTURES:
        model = TinyDiffusionModel.create("epsilon", name)
        opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, 32, 32)
        t = torch.randint(0, 1000, (batch,)).float()
        cond = model.encode_prompts(["two squares"] * batch)

        seconds = _time(_train_step, model, opt, x, t, cond, repeat=2)
        print(f"| {name} | {seconds:.2f} | {batch / seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# Tiny-model benchmark ({args.threads} threads, batch {args.batch}, torch {torch.__version__})\n")
    forward_table(args.batch)
    sampling_table(args.batch)
    training_table(args.batch)


if __name__ == "__main__":
    main()
