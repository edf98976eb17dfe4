"""Signal-to-noise of the Diffusion-DPO gradient at the base model, by timestep range and weighting.

For K batches of B pairs (the step draws of `train_dpo`), the per-batch gradient g_k of the DPO loss
with respect to every weight is computed at the base model (policy = reference). With mean g and the
summed per-coordinate variance V of the g_k:

    signal = |mean g|^2 - V / K     (an unbiased estimate of |E g|^2)
    SNR per batch = signal / V

SNR per batch tells how many batches the optimiser needs before the true gradient direction stands out
of the noise (about 1 / SNR). Errors can be reweighted per timestep before the loss
("v": 1 / abar_t, the v-prediction error; "x0": (1 - abar_t) / abar_t clamped at 20, the x0 error;
"min_snr5": min(SNR_t, 5) / SNR_t as in min-SNR-gamma training), with beta divided by the mean weight.

    python benchmarks/dpo_gradient_snr.py --store prefs.db --batches 24

Needs a store of base-model pairs (`diffalign prefs simulate --model base --pairs 2000 --store S`);
prints one line per setting. Epsilon-model (DDPM) weightings only.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffalign.align.dpo import DPOConfig, StepDraw, _errors, draw_step, pair_batch, training_data
from diffalign.align.losses import diffusion_dpo_loss
from diffalign.models.registry import load_model
from diffalign.prefs.store import PreferenceStore

WEIGHTS = {
    "none": lambda a: torch.ones_like(a),
    "v": lambda a: 1 / a,
    "x0": lambda a: ((1 - a) / a).clamp(max=20),
    "min_snr5": lambda a: (a / (1 - a)).clamp(max=5) / (a / (1 - a)),
}
RANGES = [(0, 1000), (0, 300), (300, 700), (700, 1000)]


def snr(model, data, params, batches: int, batch: int, t_range, weighting: str, beta: float) -> dict:
    grads = []
    lo, hi = t_range
    cfg = DPOConfig()
    abar = model.schedule.alphas_cumprod
    for k in range(batches):
        draw = draw_step(model, cfg, len(data), k, batch)
        u = torch.rand(batch, generator=torch.Generator().manual_seed(k))
        draw = StepDraw(draw.indices, draw.noise, (lo + (hi - lo) * u).floor(), draw.drop)
        pb = pair_batch(model, data, draw)
        err, ref = _errors(model, model.unet, pb)
        w = WEIGHTS[weighting](abar[pb.t.long()].float())
        out = diffusion_dpo_loss(
            (err * w)[:batch], (err * w)[batch:], (ref * w)[:batch], (ref * w)[batch:], beta / float(w.mean())
        )
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(out.loss, params)]))
    G = torch.stack(grads)
    var = float(G.var(0).sum())
    signal = float(G.mean(0).square().sum()) - var / batches
    return {"signal": signal, "noise_per_batch": var, "snr_per_batch": signal / var}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", default="base")
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beta", type=float, default=2000.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model)
    if model.prediction_type == "flow":
        parser.error("--model: the weightings here are for DDPM (epsilon / v) models")
    model.freeze_reference()
    pairs = PreferenceStore.open(args.store, create=False).pairs(size=model.latent_shape[-1])
    data = training_data(pairs, "dpo")
    params = [p for p in model.unet.parameters() if p.requires_grad]
    settings = [(r, "none") for r in RANGES] + [((0, 1000), w) for w in ("v", "x0", "min_snr5")]
    print("| timesteps | weighting | signal | noise per batch | SNR per batch |")
    print("|---|---|---|---|---|")
    for t_range, weighting in settings:
        started = time.perf_counter()
        r = snr(
            model,
            data,
            params,
            args.batches,
            args.batch_size,
            t_range,
            weighting,
            args.beta,
        )
        print(
            f"| [{t_range[0]}, {t_range[1]}) | {weighting} | {r['signal']:.3g} | "
            f"{r['noise_per_batch']:.3g} | {r['snr_per_batch']:.4f} | "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
