"""Train and compare the tiny base-model candidates: the recipe behind the shipped `base` models.

Runs one `diffalign pretrain` per (architecture, parameterisation) at the same time on one device
(the models are tiny, so several share a GPU), each for the same wall-clock budget with a constant
learning rate and EMA weights, then evaluates every final model and snapshot on ShapesEval and
writes a summary. Optionally packs the model folders (weights in float16) into tar files of
bounded size, for copying off a remote machine.

    python scripts/train_base_models.py --work runs/bases --time-limit 450 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run(cmd: list[str], log: Path, env: dict | None = None) -> int:
    with open(log, "w") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def to_fp16(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--archs", nargs="+", default=["unet-xs", "unet-s", "unet-m"])
    parser.add_argument("--params", nargs="+", default=["epsilon", "flow"])
    parser.add_argument("--time-limit", type=float, default=450)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=1000)
    parser.add_argument("--ema-decay", type=float, default=0.9995)
    parser.add_argument("--snapshots", nargs="*", type=int, default=[1500, 3000, 6000, 12000, 24000])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-pool", type=int, default=0, help="pre-rendered examples per run (0: stream)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, default=30)
    parser.add_argument("--eval-guidance", type=float, default=3.0)
    parser.add_argument("--eval-batch", type=int, default=300)
    parser.add_argument("--eval-workers", type=int, default=6)
    parser.add_argument("--pack-to", type=Path, default=None, help="write tar files of the models here")
    parser.add_argument("--pack-max-mb", type=float, default=15.0)
    parser.add_argument("--pack-max-files", type=int, default=4)
    args = parser.parse_args()

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "diffalign.cli"]
    runs = [(a, p) for a in args.archs for p in args.params]
    t0 = time.time()

    def train(arch_param: tuple[str, str]) -> int:
        arch, param = arch_param
        out = work / f"{arch}-{param}"
        cmd = [
            *cli, "pretrain", "--out", str(out), "--parameterization", param, "--architecture", arch,
            "--steps", "10000000", "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--lr-schedule", "constant", "--warmup-steps", str(args.warmup_steps),
            "--ema-decay", str(args.ema_decay), "--checkpoint-every", "1000000000",
            "--time-limit", str(args.time_limit), "--device", args.device,
            "--data-pool", str(args.data_pool), "--bf16" if args.bf16 else "--no-bf16",
        ]  # fmt: skip
        for s in args.snapshots:
            cmd += ["--snapshot", str(s)]
        return run(cmd, work / f"train-{arch}-{param}.log", env)

    with ThreadPoolExecutor(len(runs)) as pool:
        codes = dict(zip(runs, pool.map(train, runs)))
    print(f"training done in {time.time() - t0:.0f} s: {codes}", flush=True)

    evals = []
    for arch, param in runs:
        folder = work / f"{arch}-{param}"
        candidates = [("final", folder / "model")] + [
            (p.name, p) for p in sorted((folder / "snapshots").glob("step-*"))
        ]
        for name, model_dir in candidates:
            if (model_dir / "diffalign_model.json").is_file():
                evals.append((arch, param, name, model_dir))

    def evaluate(job: tuple[str, str, str, Path]) -> dict:
        arch, param, name, model_dir = job
        out = work / "eval" / f"{arch}-{param}-{name}"
        cmd = [
            *cli, "eval", "--model", str(model_dir), "--out", str(out),
            "--samples-per-prompt", str(args.eval_samples), "--steps", str(args.eval_steps),
            "--guidance", str(args.eval_guidance), "--batch-size", str(args.eval_batch),
            "--device", args.device,
        ]  # fmt: skip
        code = run(cmd, work / "eval" / f"{arch}-{param}-{name}.log", env)
        record = {"arch": arch, "param": param, "model": name, "code": code}
        if code == 0:
            res = json.loads((out / "results.json").read_text())
            record["overall"] = res["overall"]["score"]
            record["categories"] = {k: v["accuracy"] for k, v in res["categories"].items()}
            record["timing"] = res["timing"]
        return record

    (work / "eval").mkdir(exist_ok=True)
    t1 = time.time()
    with ThreadPoolExecutor(args.eval_workers) as pool:
        results = list(pool.map(evaluate, evals))
    print(f"evaluation done in {time.time() - t1:.0f} s", flush=True)

    metrics = {}
    for arch, param in runs:
        path = work / f"{arch}-{param}" / "metrics.jsonl"
        if path.is_file():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            metrics[f"{arch}-{param}"] = {"last": lines[-1] if lines else None, "n_records": len(lines)}
    summary = {
        "train_codes": {f"{a}-{p}": c for (a, p), c in codes.items()},
        "evals": results,
        "metrics": metrics,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    for r in sorted(results, key=lambda r: (r["arch"], r["param"], r["model"])):
        cats = " ".join(f"{k[:6]}={v:.2f}" for k, v in r.get("categories", {}).items())
        print(
            f"{r['arch']:8} {r['param']:8} {r['model']:14} overall={r.get('overall', float('nan')):.3f}",
            cats,
            flush=True,
        )

    if args.pack_to is not None:
        pack = args.pack_to
        pack.mkdir(parents=True, exist_ok=True)
        (pack / "summary.json").write_text(json.dumps(summary, indent=1))
        # Models in order of importance: finals first, then snapshots of the best architecture.
        finals = [(a, p, "final", work / f"{a}-{p}" / "model") for a, p in runs]
        scores: dict[str, list[float]] = {}
        for r in results:
            if r["model"] == "final" and "overall" in r:
                scores.setdefault(r["arch"], []).append(r["overall"])
        best = max(scores, key=lambda a: sum(scores[a]) / len(scores[a])) if scores else None
        snaps = sorted(
            (e for e in evals if e[0] == best and e[2] != "final"), key=lambda e: e[2], reverse=True
        )
        bundle, size, index = [], 0.0, 0
        budget = args.pack_max_mb * 1e6
        extra = [work / f"train-{a}-{p}.log" for a, p in runs] + [
            work / f"{a}-{p}" / "metrics.jsonl" for a, p in runs
        ]

        def flush() -> None:
            nonlocal bundle, size, index
            if not bundle:
                return
            with tarfile.open(pack / f"models-{index}.tar", "w") as tar:
                for arcname, path in bundle:
                    tar.add(path, arcname=arcname)
            bundle, size, index = [], 0.0, index + 1

        with tarfile.open(pack / "logs.tar", "w") as tar:
            for path in extra:
                if path.exists():
                    tar.add(path, arcname=str(path.relative_to(work)))
        for arch, param, name, folder in finals + snaps:
            if not (folder / "diffalign_model.json").is_file():
                continue
            to_fp16(folder)
            mb = sum(f.stat().st_size for f in folder.iterdir())
            if size + mb > budget:
                flush()
            if index >= args.pack_max_files:
                break
            bundle.append((f"{arch}-{param}-{name}", folder))
            size += mb
        flush()
        print(f"packed {index} model tar(s) into {pack}", flush=True)


if __name__ == "__main__":
    main()
