"""What a gold win rate against the base model means: the win rate of an oracle best-of-k selection.

The DPO benchmark (`benchmarks/dpo.py`) judges a tuned model by the panel's expected choice against
the base model on the same prompt (`RaterPanel.preference_prob`, mean over prompts). To read such a
figure, this script gives the win rate of a policy that draws k samples of the *base* model and keeps
the one the panel's pooled utility likes best, judged the same way against another base sample of
the same prompt (one not among the k). It needs no training: the samples are the images of a store of
simulated base-model pairs (`diffalign prefs simulate`, or the reward-model benchmark's store).

For a prompt with m stored images (two per pair) and each rotation s = 0..m-1, the candidates are the
images s, ..., s+k-1 and the opponent is image s+k (indices mod m); prompts with fewer than k+1
images are skipped. The win rate is the mean over prompts of each prompt's mean, with a 95%
bootstrap interval over prompts, as in the DPO benchmark.

    python benchmarks/win_rate_scale.py --store prefs.db --k 1 2 3 4 8

Prints one line per k; `--out FILE` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from diffalign.evaluate.stats import bootstrap_mean_ci
from diffalign.prefs.store import PreferenceStore
from diffalign.world.raters import ImageFeatures, RaterPanel


def best_of_k_win_rate(features: ImageFeatures, panel: RaterPanel, k: int) -> dict:
    """Win rate of the best of k samples (by the panel's pooled utility) over another sample of the
    same prompt; `features` = `panel.features(images, prompts)` of every sample."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    prompts = list(features.prompts)
    utility = panel.utility(features)
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_prompt[prompt].append(index)
    chosen, opponents, prompt_of = [], [], []
    for prompt, rows in by_prompt.items():
        m = len(rows)
        if m < k + 1:
            continue
        for s in range(m):
            candidates = [rows[(s + t) % m] for t in range(k)]
            chosen.append(max(candidates, key=lambda row: float(utility[row])))
            opponents.append(rows[(s + k) % m])
            prompt_of.append(prompt)
    if not chosen:
        raise ValueError(f"no prompt has the {k + 1} images that best-of-{k} needs")
    # the panel reads every image once; the judged pairs reuse those features
    p = panel.preference_prob(features.select(chosen), features.select(opponents)).double()
    per_prompt = defaultdict(list)
    for prompt, value in zip(prompt_of, p.tolist()):
        per_prompt[prompt].append(value)
    means = torch.tensor([sum(v) / len(v) for v in per_prompt.values()]).numpy()
    lo, hi = bootstrap_mean_ci(means, n_boot=2000)
    return {"k": k, "win_rate": float(means.mean()), "ci95": [lo, hi], "prompts": len(means)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="A store of simulated base-model pairs.")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--source", default="simulated", help="Only comparisons of this source.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.store.is_file():
        parser.error(f"--store {args.store}: no such file")
    pairs = PreferenceStore.open(args.store, create=False).pairs(source=args.source)
    images = torch.cat([pairs.images_a, pairs.images_b])
    prompts = list(pairs.prompts) + list(pairs.prompts)
    panel = RaterPanel()
    features = panel.features(images, prompts)
    rows = []
    for k in args.k:
        row = best_of_k_win_rate(features, panel, k)
        rows.append(row)
        lo, hi = row["ci95"]
        win = row["win_rate"]
        print(f"best-of-{k}: win rate {win:.3f} [{lo:.3f}, {hi:.3f}] over {row['prompts']} prompts")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
