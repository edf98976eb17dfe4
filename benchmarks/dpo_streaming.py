"""What streaming preference images from the store costs (`diffalign align dpo --stream`).

Two measurements, each against its in-memory baseline in the same run:

1. Reading. A store of `--pairs` pairs of `--size`-pixel JPEG images (smooth random colour fields with
   noise, about the size of a Pick-a-Pic image) is read either all at once (`PreferenceStore.pairs`,
   the in-memory baseline: time and the bytes it holds) or as references (`pair_references`), and a
   batch of `--batch` pairs is then read per step: milliseconds per batch from the store against
   indexing the in-memory tensor. Then the same batches with prefetching, as the DPO trainer does it:
   the next batch is requested, a GPU step of `--step-ms` milliseconds passes (a sleep: the CPU is
   free, as it mostly is while a GPU computes; 208 ms is the eager DPO step at 8 pairs on an H200),
   and the time the step then waits for its images is measured.
2. Training. Diffusion-DPO on the shipped `base` model (32 px) for `--steps` steps on a store of
   32-pixel pairs, in memory against streamed: seconds per step (both runs train the same
   parameters; tests/align/test_dpo_streaming.py checks they are identical).

    python benchmarks/dpo_streaming.py --out bench_streaming/        # about 2 minutes on 2 CPU cores
    python benchmarks/dpo_streaming.py --pairs 16 --size 64 --steps 2 --out /tmp/s   # smoke
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffalign.align.dpo import DPOConfig, train_dpo
from diffalign.align.runtime import RuntimeConfig
from diffalign.prefs.records import NewComparison
from diffalign.prefs.store import PreferenceStore


def jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random colour field with pixel noise, JPEG quality 90."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_store(path: Path, pairs: int, size: int, seed: int) -> PreferenceStore:
    rng = np.random.default_rng(seed)
    store = PreferenceStore.open(path)
    prompts = ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]
    store.add(
        [
            NewComparison(
                prompt=prompts[i % len(prompts)],
                images=[jpeg(rng, size), jpeg(rng, size)],
                choice="image",
                chosen=i % 2,
                rater="bench",
                source="bench",
                key=f"bench:{i}",
            )
            for i in range(pairs)
        ]
    )
    return store


def reading(folder: Path, args: argparse.Namespace) -> dict:
    store = make_store(folder / f"read{args.size}.db", args.pairs, args.size, args.seed)
    start = time.perf_counter()
    in_memory = store.pairs(size=args.size)
    load_s = time.perf_counter() - start
    held = in_memory.images_a.numel() + in_memory.images_b.numel()
    start = time.perf_counter()
    refs = store.pair_references(size=args.size)
    refs_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(len(refs), (args.batch,), generator=gen) for _ in range(args.steps)]
    start = time.perf_counter()
    for idx in batches:
        in_memory.images_a[idx], in_memory.images_b[idx]
    memory_ms = (time.perf_counter() - start) / len(batches) * 1e3
    serial = store.pair_references(size=args.size, read_workers=0)
    start = time.perf_counter()
    for idx in batches:
        serial.images_a[idx], serial.images_b[idx]
    stream_ms = (time.perf_counter() - start) / len(batches) * 1e3
    columns = (refs.images_a, refs.images_b)  # read_workers=4, as `--stream` uses
    waited = 0.0
    for column in columns:
        column.prefetch(batches[0])
    for k, idx in enumerate(batches):
        for column in columns:
            column.prefetch(batches[k + 1] if k + 1 < len(batches) else [])
        time.sleep(args.step_ms / 1e3)
        start = time.perf_counter()
        for column in columns:
            column[idx]
        waited += time.perf_counter() - start
    for column in columns:
        column.close()
    return {
        "pairs": args.pairs,
        "size": args.size,
        "batch_pairs": args.batch,
        "in_memory_load_s": load_s,
        "in_memory_bytes": held,
        "references_load_s": refs_s,
        "batch_read_ms_in_memory": memory_ms,
        "batch_read_ms_streamed": stream_ms,
        "gpu_step_ms": args.step_ms,
        "batch_wait_ms_prefetched": waited / len(batches) * 1e3,
    }


def training(folder: Path, args: argparse.Namespace) -> dict:
    store = make_store(folder / "train32.db", max(args.batch * 4, 64), 32, args.seed)
    config = DPOConfig(
        model="base",
        steps=args.steps,
        batch_size=args.batch,
        log_every=args.steps,
        checkpoint_every=args.steps,
        log_with="none",
        runtime=RuntimeConfig(device="cpu"),
    )
    seconds = {}
    for name, pairs in (("in_memory", store.pairs(size=32)), ("streamed", store.pair_references(size=32))):
        start = time.perf_counter()
        train_dpo(config, pairs, folder / f"run-{name}")
        seconds[name] = (time.perf_counter() - start) / args.steps
    return {
        "steps": args.steps,
        "batch_pairs": args.batch,
        **{f"s_per_step_{k}": v for k, v in seconds.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench_streaming"))
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-ms", type=float, default=208.0, help="the GPU step the reads hide behind")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"reading": reading(Path(tmp), args), "training": training(Path(tmp), args)}
    r, t = results["reading"], results["training"]
    results["ratios"] = {
        "batch_read_streamed_over_in_memory": r["batch_read_ms_streamed"] / r["batch_read_ms_in_memory"],
        "batch_wait_prefetched_over_in_memory": r["batch_wait_ms_prefetched"] / r["batch_read_ms_in_memory"],
        "dpo_step_streamed_over_in_memory": t["s_per_step_streamed"] / t["s_per_step_in_memory"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
