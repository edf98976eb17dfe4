"""DPO and KTO on pairs whose images stay in the store until a batch reads them (`--stream`): the
same training as in memory, only the drawn images read, resumable, and reachable from the CLI."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from diffalign.align.dpo import train_dpo, training_data
from diffalign.cli.align import app
from diffalign.prefs.records import NewComparison
from diffalign.prefs.simulate import encode_png
from diffalign.prefs.store import PreferenceStore
from diffalign.prefs.stored_pairs import StoredImages, StoredPairs
from tests.align.helpers import CANVAS, config, make_pairs


def _store(path, n=10, ties=2) -> PreferenceStore:
    pairs = make_pairs(n, seed=3, ties=ties)
    store = PreferenceStore.open(path)
    items = []
    for i in range(n):
        prob = float(pairs.prob_a[i])
        tie = prob == 0.5
        items.append(
            NewComparison(
                prompt=pairs.prompts[i],
                images=[encode_png(pairs.images_a[i]), encode_png(pairs.images_b[i])],
                choice="tie" if tie else "image",
                chosen=None if tie else (0 if prob == 1.0 else 1),
                rater="r",
                source="test",
                key=f"test:{i}",
            )
        )
    store.add(items)
    return store


class CountingReads:
    """Counts the images a store is asked to decode."""

    def __init__(self, store: PreferenceStore) -> None:
        self.store, self.reads = store, 0

    def load_image(self, sha256, size=None):
        self.reads += 1
        return self.store.load_image(sha256, size)


def test_references_read_nothing_and_load_what_pairs_returns(tmp_path):
    store = _store(tmp_path / "p.db")
    refs = store.pair_references(size=CANVAS)
    counting = CountingReads(store)
    refs.reader = counting
    assert isinstance(refs, StoredPairs) and isinstance(refs.images_a, StoredImages)
    assert len(refs) == 10 and counting.reads == 0
    loaded, in_memory = refs.load(), store.pairs(size=CANVAS)
    assert loaded.prompts == in_memory.prompts and torch.equal(loaded.prob_a, in_memory.prob_a)
    assert torch.equal(loaded.images_a, in_memory.images_a) and torch.equal(
        loaded.images_b, in_memory.images_b
    )
    assert counting.reads == 20
    column = refs.images_b
    assert column.shape == (10, 3, CANVAS, CANVAS)
    assert torch.equal(column[torch.tensor([4, 1])], in_memory.images_b[torch.tensor([4, 1])])
    assert torch.equal(column[3], in_memory.images_b[3]) and column[[]].shape == (0, 3, CANVAS, CANVAS)


def test_training_data_from_references_matches_memory_and_fingerprints_by_hash(tmp_path):
    store = _store(tmp_path / "p.db")
    refs, in_memory = store.pair_references(size=CANVAS), store.pairs(size=CANVAS)
    for method in ("dpo", "kto"):
        lazy, eager = training_data(refs, method), training_data(in_memory, method)
        assert len(lazy) == len(eager) == (8 if method == "dpo" else 16) and lazy.ties_dropped == 2
        assert torch.equal(lazy.images[torch.arange(len(lazy))], eager.images)
        if method == "dpo":
            assert torch.equal(lazy.others[torch.arange(len(lazy))], eager.others)
        assert torch.equal(lazy.prompt_index, eager.prompt_index)
    assert training_data(refs).fingerprint == training_data(store.pair_references(size=CANVAS)).fingerprint
    assert training_data(refs).fingerprint != training_data(store.pair_references(size=8)).fingerprint


def test_soft_labels_from_references_match_memory(tmp_path):
    store = _store(tmp_path / "p.db")
    refs, in_memory = store.pair_references(size=CANVAS), store.pairs(size=CANVAS)
    lazy = training_data(refs, soft_labels=True, label_smoothing=0.1)
    eager = training_data(in_memory, soft_labels=True, label_smoothing=0.1)
    assert len(lazy) == len(eager) == 10 and lazy.ties_kept == eager.ties_kept == 2
    assert torch.equal(lazy.labels, eager.labels) and sorted(set(lazy.labels.tolist())) == pytest.approx(
        [0.5, 0.9]
    )
    assert torch.equal(lazy.images[torch.arange(10)], eager.images)
    assert torch.equal(lazy.others[torch.arange(10)], eager.others)


@pytest.mark.parametrize("method", ["dpo", "kto", "dpo-soft"])
def test_streamed_training_equals_in_memory_training_and_reads_only_the_batches(
    tmp_path, eps_model_dir, method
):
    store = _store(tmp_path / "p.db")
    soft = {"soft_labels": True} if method == "dpo-soft" else {}
    method = method.removesuffix("-soft")
    cfg = config(eps_model_dir, method=method, steps=3, batch_size=4, **soft)
    eager = train_dpo(cfg, store.pairs(size=CANVAS), tmp_path / "eager")
    refs = store.pair_references(size=CANVAS)
    counting = CountingReads(store)
    refs.reader = counting
    lazy = train_dpo(cfg, refs, tmp_path / "lazy")
    for (name, a), b in zip(eager.unet.state_dict().items(), lazy.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    images_per_example = 2 if method == "dpo" else 1
    assert counting.reads == cfg.steps * cfg.batch_size * images_per_example


def test_streamed_run_resumes_like_an_uninterrupted_one(tmp_path, eps_model_dir):
    store = _store(tmp_path / "p.db")
    cfg = config(eps_model_dir, steps=4, checkpoint_every=2)
    whole = train_dpo(cfg, store.pair_references(size=CANVAS), tmp_path / "whole")
    train_dpo(cfg, store.pair_references(size=CANVAS), tmp_path / "parts", stop_after=2)
    resumed = train_dpo(cfg, store.pair_references(size=CANVAS), tmp_path / "parts", resume=True)
    for a, b in zip(whole.unet.state_dict().values(), resumed.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_references_need_a_size_and_labelled_pairs(tmp_path):
    store = _store(tmp_path / "p.db")
    with pytest.raises(ValueError, match="size must be >= 1"):
        store.pair_references(size=0)
    with pytest.raises(Exception, match="no labelled pairs from source 'nope'"):
        store.pair_references(size=CANVAS, source="nope")


def test_cli_dpo_stream(tmp_path, eps_model_dir):
    _store(tmp_path / "p.db")
    args = [
        "dpo",
        "--store",
        tmp_path / "p.db",
        "--out",
        tmp_path / "run",
        "--model",
        eps_model_dir,
        "--stream",
    ]
    args += ["steps=2", "batch_size=2", "log_with=none", "runtime.device=cpu"]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "read as batches need them" in result.output and (tmp_path / "run" / "model").is_dir()


def test_prefetch_reads_in_the_background_and_indexing_takes_those_reads(tmp_path):
    store = _store(tmp_path / "p.db")
    refs = store.pair_references(size=CANVAS, read_workers=2)
    counting = CountingReads(store)
    refs.reader = counting
    column = refs.images_a
    column.prefetch(torch.tensor([1, 2, 5]))
    assert set(column._pending) == {1, 2, 5}
    for future in column._pending.values():
        future.result()
    assert counting.reads == 3
    rows = column[torch.tensor([2, 1, 0])]
    assert counting.reads == 4 and set(column._pending) == {5}  # 1 and 2 taken, 0 read now
    assert torch.equal(rows, store.pairs(size=CANVAS).images_a[torch.tensor([2, 1, 0])])
    column.close()
    assert not column._pending


def test_a_failed_background_read_is_raised_when_the_row_is_used(tmp_path):
    store = _store(tmp_path / "p.db")
    refs = store.pair_references(size=CANVAS, read_workers=1)
    column = refs.images_b
    store.image_path(column.hashes[3]).write_bytes(b"not an image")
    column.prefetch([3])
    with pytest.raises(Exception, match="does not match its hash"):
        column[[3]]
    column.close()


def test_read_workers_do_not_change_training(tmp_path, eps_model_dir):
    store = _store(tmp_path / "p.db")
    cfg = config(eps_model_dir, steps=3)
    serial = train_dpo(cfg, store.pair_references(size=CANVAS, read_workers=0), tmp_path / "serial")
    threaded = train_dpo(cfg, store.pair_references(size=CANVAS, read_workers=3), tmp_path / "threaded")
    for a, b in zip(serial.unet.state_dict().values(), threaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
