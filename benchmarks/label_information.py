"""What a set of labelled pairs can buy: the win rate of the base model's distribution tilted by a
reward model trained on those pairs, against the KL divergence of the tilt from the base.

The DPO objective's optimum is the reference tilted by the labels' Bradley-Terry reward,
pi*(x) ∝ pi_ref(x) exp(r(x) / beta) (Rafailov et al. 2023, eq. 4), so what a label set can teach a
DPO-tuned model is bounded in practice by how well a reward model fitted on the same pairs ranks
fresh samples. This script measures that on the Shapes world, with no DPO training:

1. draw K samples of the base model for each ShapesEval prompt (seeds disjoint from the DPO
   benchmark's);
2. for every sample i of a prompt, beats_i = the gold panel's pooled P(i beats j), averaged over the
   prompt's other samples j: the win rate against a fresh base sample, judged as `benchmarks/dpo.py`
   judges (`RaterPanel.preference_prob`);
3. fit a Bradley-Terry reward model on the first N pairs of a store (the pairs offline DPO trains on)
   and score the samples;
4. for each selector score s (the gold pooled utility, the learned reward) and temperature tau, the
   tilted policy puts w_i = softmax(s_i / tau) on the prompt's samples: win rate sum_i w_i beats_i and
   KL(w || uniform) = sum_i w_i log(K w_i). Best-of-k (the best of k of the K samples drawn at random,
   by the selector) is computed exactly from ranks: the i-th lowest of K is the best of a random
   k-subset with probability C(i - 1, k - 1) / C(K, k).

The gold rows say how far the base distribution must move for a win rate (what perfect knowledge of
the panel buys at each KL); the learned rows say how much of that the labels carry. A tuned model can
still beat the learned rows (its own architecture and prior differ from the reward model's), so they
are a measurement, not a theorem. The tilt is over K samples, so its KL is at most log K.

    python benchmarks/label_information.py --model base --store prefs.db --pairs 2000 --per-prompt 12 \
        --eval-stride 2 --out bench_label_info

Prints a table; writes results.json (and the samples, samples.pt, reused by a rerun with the same
model, K and prompts) in --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from diffalign.align.config_io import load_config
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.evaluate.stats import bootstrap_mean_ci
from diffalign.models.registry import load_model
from diffalign.prefs.simulate import simulate_preferences
from diffalign.prefs.store import PreferenceStore
from diffalign.rewards.bt_training import RewardTrainConfig, train_reward_model
from diffalign.world.raters import ImageFeatures, RaterPanel
from diffalign.world.shapeseval import load_shapeseval

SAMPLE_SEED = 50_000  # the DPO benchmark judges with seeds from 10,000; the store's pairs use others
TEMPERATURES = (4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.03)  # in units of the selector's spread over samples


def _dpo_benchmark():
    """benchmarks/dpo.py (a script, not a package): its sampling and pair-selection helpers."""
    spec = importlib.util.spec_from_file_location("dpo_benchmark", Path(__file__).with_name("dpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def within_prompt_beats(features: ImageFeatures, panel: RaterPanel, per_prompt: int) -> Tensor:
    """[P, K] float64: sample i of prompt p beats another sample of p with this mean panel probability.
    `features` holds P prompts' K samples, prompt-major (rows p*K .. p*K+K-1)."""
    k = per_prompt
    if k < 2 or len(features) % k:
        raise ValueError(f"need at least 2 samples per prompt and {len(features)} divisible by {k}")
    prompts = len(features) // k
    first, second = zip(*[(i, j) for i in range(k) for j in range(k) if i != j])
    rows_a = [p * k + i for p in range(prompts) for i in first]
    rows_b = [p * k + j for p in range(prompts) for j in second]
    prob = panel.preference_prob(features.select(rows_a), features.select(rows_b)).double()
    matrix = torch.zeros(prompts, k, k, dtype=torch.float64)
    matrix[:, list(first), list(second)] = prob.view(prompts, -1)
    return matrix.sum(dim=2) / (k - 1)


def _summary(per_prompt: Tensor) -> dict:
    values = per_prompt.numpy()
    lo, hi = bootstrap_mean_ci(values, n_boot=2000)
    return {"win_rate": float(values.mean()), "ci95": [lo, hi]}


def tilt(scores: Tensor, beats: Tensor, temperature: float) -> dict:
    """The policy w = softmax(scores / temperature) over each prompt's samples: its win rate against a
    base sample (with a 95% interval over prompts) and its mean KL(w || uniform) in nats."""
    weights = torch.softmax(scores.double() / temperature, dim=1)
    k = scores.shape[1]
    kl = torch.special.xlogy(weights, weights * k).sum(dim=1)
    return {"temperature": temperature, "kl": float(kl.mean()), **_summary((weights * beats).sum(dim=1))}


def best_of_k(scores: Tensor, beats: Tensor, k: int) -> dict:
    """Best of k samples drawn without replacement from the K, by `scores` (ties: the lower index
    ranks lower), judged by `beats`; exact over all k-subsets. KL = log k - (k - 1) / k holds only for
    continuous draws and is not reported."""
    total = scores.shape[1]
    if not 1 <= k <= total:
        raise ValueError(f"best-of-{k} needs 1 <= k <= {total} samples per prompt")
    ranks = torch.argsort(torch.argsort(scores, dim=1, stable=True), dim=1)  # 0 = lowest
    chance = torch.tensor([math.comb(r, k - 1) / math.comb(total, k) for r in range(total)])
    return {"k": k, **_summary((chance[ranks] * beats).sum(dim=1))}


def selector_rows(name: str, scores: Tensor, beats: Tensor, ks: list[int]) -> dict:
    spread = float(scores.double().std())
    if not spread > 0:
        raise ValueError(f"{name}: the scores do not vary over the samples; nothing to tilt by")
    return {
        "tilt": [tilt(scores, beats, spread * t) for t in TEMPERATURES],
        "best_of": [best_of_k(scores, beats, k) for k in ks],
    }


def ranking_agreement(scores: Tensor, utility: Tensor, margin: float) -> float:
    """Share of a prompt's sample pairs (over all prompts) that `scores` order as the gold `utility`
    does, among pairs whose utilities differ by more than `margin` (the panel's tie margin)."""
    gold = utility.unsqueeze(2) - utility.unsqueeze(1)
    same = (scores.unsqueeze(2) - scores.unsqueeze(1)).sign() == gold.sign()
    return float(same[gold.abs() > margin].double().mean())


def label_agreement(panel: RaterPanel, pairs) -> dict:
    """How often a stored label agrees with the pooled gold utility's sign (pairs whose utilities differ
    by more than the panel's tie margin), and how many pairs have a winner."""
    decided = pairs.without_ties()
    delta = panel.utility(panel.features(decided.images_a, decided.prompts)) - panel.utility(
        panel.features(decided.images_b, decided.prompts)
    )
    clear = delta.abs() > panel.config.tie_margin
    agree = ((delta > 0) == (decided.prob_a > 0.5))[clear]
    return {
        "pairs_with_winner": len(decided),
        "gold_clear": int(clear.sum()),
        "agree": float(agree.double().mean()),
    }


def samples(args, model, prompts: list[str], repeated: list[str], out: Path, dpo) -> Tensor:
    """The K samples of every prompt (`repeated`: each prompt K times, prompt-major), from the cache in
    `out` when it was drawn for the same model, K, prompts and seed."""
    cache = out / "samples.pt"
    key = {"model": args.model, "per_prompt": args.per_prompt, "prompts": prompts, "seed": SAMPLE_SEED}
    if cache.is_file():
        stored = torch.load(cache)
        if stored["key"] == key:
            return stored["images"]
    sampler = SamplerConfig.for_prediction_type(model.prediction_type)
    images = dpo.generate(model, repeated, sampler, seed=SAMPLE_SEED, batch=args.sample_batch)
    torch.save({"key": key, "images": images}, cache)
    return images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument(
        "--store", default=None, help="simulated pairs of --model, extended if short (default: OUT/prefs.db)"
    )
    parser.add_argument("--pairs", type=lambda s: [int(x) for x in s.split(",")], default=[2000])
    parser.add_argument("--per-prompt", type=int, default=12, help="K base samples per prompt")
    parser.add_argument("--eval-stride", type=int, default=2, help="every K-th ShapesEval prompt")
    parser.add_argument("--best-of", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3, 4])
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="RewardTrainConfig fields, e.g. epochs=30"
    )
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_label_info")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dpo = _dpo_benchmark()
    panel = RaterPanel()
    model = load_model(args.model)
    prompts = [m["prompt"] for m in load_shapeseval()[:: args.eval_stride]]
    started = time.perf_counter()
    repeated = [p for p in prompts for _ in range(args.per_prompt)]
    images = samples(args, model, prompts, repeated, out, dpo)
    features = panel.features(images, repeated)
    beats = within_prompt_beats(features, panel, args.per_prompt)
    shape = (len(prompts), args.per_prompt)
    gold_utility = panel.utility(features).view(shape)
    results = {
        "args": vars(args),
        "prompts": len(prompts),
        "sample_seconds": time.perf_counter() - started,
        "gold": selector_rows("gold", gold_utility, beats, args.best_of),
        "learned": [],
    }
    store = PreferenceStore.open(args.store or out / "prefs.db")
    simulate_preferences(model, store, max(args.pairs), batch_size=args.sample_batch, model_name=args.model)
    stored = store.pairs(size=model.latent_shape[-1], include_ties=True)
    config = load_config(RewardTrainConfig, None, args.set)
    for n in args.pairs:
        pairs = dpo.first_pairs(stored, n)
        started = time.perf_counter()
        fitted = train_reward_model(pairs, config)
        reward = fitted.model.eval()
        with torch.no_grad():
            scores = torch.cat(
                [reward(images[s : s + 256], repeated[s : s + 256]) for s in range(0, len(repeated), 256)]
            ).view(shape)
        results["learned"].append(
            {
                "pairs": n,
                "labels": label_agreement(panel, pairs),
                "ranking_agreement": ranking_agreement(scores, gold_utility, panel.config.tie_margin),
                "held_out_accuracy": next(
                    r["held_out_accuracy"] for r in fitted.history if r["epoch"] == fitted.best_epoch
                ),
                "train_seconds": time.perf_counter() - started,
                **selector_rows(f"reward model on {n} pairs", scores.double(), beats, args.best_of),
            }
        )
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print_table(results)
    return results


def print_table(results: dict) -> None:
    def line(name: str, row: dict, how: str) -> str:
        lo, hi = row["ci95"]
        return f"| {name} | {how} | {row['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] |"

    print("| selector | policy | win rate vs a base sample [95% CI] |")
    print("|---|---|---|")
    sets = [("gold pooled utility", results["gold"])]
    sets += [(f"reward model, {r['pairs']} pairs", r) for r in results["learned"]]
    for name, rows in sets:
        for row in rows["tilt"]:
            print(line(name, row, f"tilt, KL {row['kl']:.2f} nats"))
        for row in rows["best_of"]:
            print(line(name, row, f"best of {row['k']}"))


if __name__ == "__main__":
    main()
