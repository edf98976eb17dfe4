"""`diffalign collect add-images`: pairs of images other programs made, from a GenEval-layout folder or
a JSONL manifest."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.collect.image_sets import image_set_pair_tasks, read_image_sets
from diffalign.collect.models import CollectTask
from diffalign.collect.storage import read_connection
from diffalign.prefs.schema import Prompt
from diffalign.prefs.store import PreferenceStore
from diffalign.rewards.ensemble import RewardEnsemble
from diffalign.rewards.learned import build_reward_model

runner = CliRunner()
PROMPTS = ["a cat in a hat", "une tour rouge \N{TOKYO TOWER}"]


def _image(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _geneval_folder(root: Path) -> Path:
    """Two prompts of three images each (PNG, JPEG, WebP; other sizes), one prompt with one image."""
    for n, prompt in enumerate([*PROMPTS, "alone"]):
        samples = root / f"{n:05d}" / "samples"
        samples.mkdir(parents=True)
        (root / f"{n:05d}" / "metadata.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
        formats = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][: 1 if prompt == "alone" else 3]
        for k, (fmt, suffix) in enumerate(formats):
            (samples / f"{k:04d}.{suffix}").write_bytes(_image(10 * n + k, (40 + 8 * k, 30), fmt))
    return root


def _queued(store_path: Path) -> list[tuple[str, str, str]]:
    """(prompt, image_a sha, image_b sha) of every queued task."""
    with read_connection(PreferenceStore.open(str(store_path))) as conn:
        rows = conn.execute(
            select(Prompt.text, CollectTask.image_a, CollectTask.image_b).join(
                Prompt, Prompt.id == CollectTask.prompt_id
            )
        ).all()
    return [tuple(r) for r in rows]


def test_a_geneval_folder_queues_every_pair_of_each_prompts_files_as_they_are(tmp_path):
    folder = _geneval_folder(tmp_path / "gen")
    sets = read_image_sets(folder)
    assert [s.prompt for s in sets] == PROMPTS  # the one-image prompt has nothing to compare
    tasks = image_set_pair_tasks(sets)
    assert len(tasks) == 6 and all(t.priority == 0.0 for t in tasks)
    files = {p.read_bytes() for s in sets for p in s.paths}
    assert {t.image_a for t in tasks} | {t.image_b for t in tasks} == files  # byte for byte

    store = tmp_path / "prefs.db"
    result = runner.invoke(app, ["collect", "add-images", str(folder), "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert "queued 6 new pairs" in result.output
    queued = _queued(store)
    assert sorted(p for p, _, _ in queued) == sorted([PROMPTS[0]] * 3 + [PROMPTS[1]] * 3)
    sha = {hashlib.sha256(b).hexdigest() for b in files}
    assert {a for _, a, _ in queued} | {b for _, _, b in queued} == sha
    again = runner.invoke(app, ["collect", "add-images", str(folder), "--store", str(store)])
    assert "queued 0 new pairs (6 already queued)" in again.output


def test_a_manifest_resolves_paths_against_its_folder_and_skips_copies(tmp_path):
    (tmp_path / "out").mkdir()
    for k in range(3):
        (tmp_path / "out" / f"{k}.png").write_bytes(_image(k))
    (tmp_path / "out" / "copy.png").write_bytes(_image(0))
    manifest = tmp_path / "m.jsonl"
    line = {"prompt": "two dogs", "images": ["out/0.png", "out/copy.png", "out/1.png", "out/2.png"]}
    manifest.write_text("\ufeff" + json.dumps(line) + "\r\n\n")
    tasks = image_set_pair_tasks(read_image_sets(manifest), max_pairs=4)
    assert len(tasks) == 4  # of 5 candidates: 0.png and copy.png are the same file
    assert all(t.image_a != t.image_b for t in tasks)
    assert tasks[0].image_meta[0]["path"].endswith("0.png")


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"prompt": "x", "images": ["out/none.png", "out/0.png"]}',
            r"m\.jsonl line 1: images\[0\].*not a file",
        ),
        (
            '{"prompt": "", "images": ["out/0.png", "out/1.png"]}',
            r"m\.jsonl line 1: 'prompt' must be non-empty",
        ),
        ("[1, 2]", r"m\.jsonl line 1: expected an object"),
        ("{oops", r"m\.jsonl line 1: not valid JSON"),
        ('{"prompt": "x", "images": ["out/0.png"]}', "no prompt with two or more images"),
    ],
)
def test_bad_manifests_are_named_by_line_and_queue_nothing(tmp_path, content, message):
    (tmp_path / "out").mkdir()
    for k in range(2):
        (tmp_path / "out" / f"{k}.png").write_bytes(_image(k))
    (tmp_path / "m.jsonl").write_text(content + "\n")
    store = tmp_path / "prefs.db"
    result = runner.invoke(app, ["collect", "add-images", str(tmp_path / "m.jsonl"), "--store", str(store)])
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not store.exists()


def test_a_damaged_image_is_named_and_nothing_is_queued(tmp_path):
    folder = _geneval_folder(tmp_path / "gen")
    (folder / "00001" / "samples" / "0001.jpg").write_bytes(b"\xff\xd8 broken")
    store = tmp_path / "prefs.db"
    result = runner.invoke(app, ["collect", "add-images", str(folder), "--store", str(store)])
    assert result.exit_code == 2 and "0001.jpg: not an image PIL can read" in " ".join(result.output.split())
    assert not store.exists()  # every file is read before the store is opened: nothing is queued


def test_active_mode_ranks_existing_images_by_the_ensembles_disagreement(tmp_path):
    folder = _geneval_folder(tmp_path / "gen")
    sets = read_image_sets(folder)
    ensemble = RewardEnsemble([build_reward_model(PROMPTS, seed=s) for s in range(3)])
    tasks = image_set_pair_tasks(sets, max_pairs=3, ensemble=ensemble)
    size = ensemble.members[0].config.image_size

    def pixels(data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255

    scores = []
    for image_set in sets:
        files = [p.read_bytes() for p in image_set.paths]
        for i in range(3):
            for j in range(i + 1, 3):
                with torch.no_grad():
                    margins = torch.stack(
                        [
                            m(pixels(files[i]), [image_set.prompt]) - m(pixels(files[j]), [image_set.prompt])
                            for m in ensemble.members
                        ]
                    )
                scores.append(torch.sigmoid(margins).var(correction=0).item())
    expected = sorted(scores, reverse=True)[:3]
    assert [t.priority for t in tasks] == pytest.approx(expected, rel=1e-3, abs=1e-9)
