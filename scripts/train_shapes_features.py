"""Train the Shapes feature extractor used by FID/KID (`diffalign.evaluate.features`), on CPU.

Draws fresh rendered scenes of `diffalign.world.dataset` every step and regresses their content
(counts per shape and colour, object count, mean position) with MSE; prints the held-out error and
writes safetensors weights (default: the shipped `src/diffalign/evaluate/weights/`).

    .venv/bin/python scripts/train_shapes_features.py --steps 600
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffalign.evaluate.features import WEIGHTS_PATH, ShapesFeatureNet, save_feature_net, scene_targets
from diffalign.world.dataset import ShapesGenerator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine-decayed)")
    parser.add_argument("--features", type=int, default=64, help="feature dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="weights file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = ShapesGenerator()
    gen = torch.Generator().manual_seed(args.seed)
    held_out = world.sample(512, torch.Generator().manual_seed(args.seed + 1))
    held_targets = scene_targets(held_out.scenes)
    net = ShapesFeatureNet(args.features)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    started = time.perf_counter()
    for step in range(args.steps):
        batch = world.sample(args.batch, gen)
        loss = torch.nn.functional.mse_loss(net.predict(batch.images), scene_targets(batch.scenes))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            with torch.no_grad():
                held = torch.nn.functional.mse_loss(net.predict(held_out.images), held_targets)
            print(f"step {step}: train mse {loss.item():.4f}, held-out mse {held.item():.4f}", flush=True)
    with torch.no_grad():
        err = (net.predict(held_out.images) - held_targets).abs()
        count_acc = (err[:, :-2].round() == 0).float().mean()
    print(f"held-out: count accuracy (rounded) {count_acc:.3f}, position MAE {err[:, -2:].mean():.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_feature_net(net.eval(), args.out)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
