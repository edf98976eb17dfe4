"""Unpaired like/dislike feedback read from JSONL and CSV files (`diffalign.prefs.ratings`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.align.dpo import training_data
from diffalign.prefs.ratings import ImageRatings, RatingsError, read_ratings
from tests.align.helpers import make_pairs


def _image(path, size=(16, 16), seed=0, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_jsonl_ratings_read_images_as_viewed_and_fitted(tmp_path):
    (tmp_path / "out").mkdir()
    _image(tmp_path / "out" / "a.png")
    _image(tmp_path / "out" / "wide.png", size=(32, 16), seed=1)  # not square: centre-cropped
    _image(tmp_path / "out" / "grey.png", seed=2, mode="LA")  # grey with alpha
    path = _jsonl(
        tmp_path / "ratings.jsonl",
        [
            {"prompt": " a red circle ", "image": "out/a.png", "liked": True},
            {"prompt": "a square", "image": "out/wide.png", "liked": 0},
            {"prompt": "a square", "image": "out/grey.png", "liked": "yes", "extra": "kept out"},
        ],
    )
    ratings = read_ratings(path, size=16)
    assert ratings.prompts == ["a red circle", "a square", "a square"]
    assert ratings.liked.tolist() == [True, False, True] and ratings.counts == (2, 1)
    assert ratings.images.shape == (3, 3, 16, 16) and ratings.images.dtype == torch.uint8
    assert ratings.where[1] == f"{path} line 2"
    a = np.array(Image.open(tmp_path / "out" / "a.png"))
    assert torch.equal(ratings.images[0], torch.from_numpy(a).permute(2, 0, 1))
    wide = Image.open(tmp_path / "out" / "wide.png").resize((32, 16))
    middle = np.array(wide.crop((8, 0, 24, 16)))  # the centre of a 32 x 16 image, its own size
    assert torch.equal(ratings.images[1], torch.from_numpy(middle).permute(2, 0, 1))


def test_csv_ratings_with_quoted_fields_and_words_for_the_label(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png", seed=1)
    path = tmp_path / "ratings.csv"
    path.write_text(
        'image,prompt,liked\na.png,"a circle, red",Like\n\nb.png,"two\nlines",DOWN\nb.png,c, 1.0 \n',
        encoding="utf-8",
    )
    ratings = read_ratings(path, size=8)
    assert ratings.prompts == ["a circle, red", "two\nlines", "c"]
    assert ratings.liked.tolist() == [True, False, True]
    assert ratings.where == [f"{path} line 2", f"{path} line 4", f"{path} line 6"]
    assert ratings.images.shape[-1] == 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "image": "a.png", "liked": "maybe"}\n', "line 1: 'liked' must be true or false"),
        ('{"prompt": "a", "image": "a.png", "liked": 2}\n', "'liked' must be true or false"),
        ('{"prompt": "a", "image": "a.png", "liked": 0.5}\n', "'liked' must be true or false"),
        ('{"prompt": "a", "image": "a.png", "liked": null}\n', "'liked' must be true or false"),
        ('\n{"prompt": "", "image": "a.png", "liked": true}\n', "line 2: 'prompt' must be non-empty"),
        ('{"prompt": "a", "image": "gone.png", "liked": true}\n', "gone.png is not a file"),
        ('{"prompt": "a", "image": "bad.png", "liked": true}\n', "bad.png is not an image PIL can read"),
        ('{"prompt": "a", "image": 3, "liked": true}\n', "'image' must be a file path"),
        ("[1, 2]\n", "expected an object"),
        ("{not json\n", "line 1: not valid JSON"),
        ("\n\n", "no ratings"),
    ],
)
def test_a_bad_jsonl_record_is_named_by_line(tmp_path, content, message):
    _image(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = tmp_path / "r.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RatingsError, match=message):
        read_ratings(path, size=8)


def test_bad_csv_files_and_paths_are_named(tmp_path):
    _image(tmp_path / "a.png")
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("prompt,file,liked\na,a.png,1\n", encoding="utf-8")
    with pytest.raises(RatingsError, match=r"line 1: the header lacks the column\(s\) \['image'\]"):
        read_ratings(bad_header, size=8)
    short = tmp_path / "s.csv"
    short.write_text("prompt,image,liked\na,a.png,1\nb,a.png\n", encoding="utf-8")
    with pytest.raises(RatingsError, match="line 3: 2 fields, the header has 3"):
        read_ratings(short, size=8)
    with pytest.raises(RatingsError, match="no such ratings file"):
        read_ratings(tmp_path / "none.jsonl", size=8)
    other = tmp_path / "r.txt"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(RatingsError, match=r"\.jsonl or \.csv"):
        read_ratings(other, size=8)
    latin = tmp_path / "l.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(RatingsError, match=r"l\.jsonl"):
        read_ratings(latin, size=8)


def test_pairs_become_likes_and_dislikes_as_kto_trains_on_them():
    pairs = make_pairs(6, ties=2)
    ratings = ImageRatings.from_pairs(pairs)
    from_pairs = training_data(pairs, "kto")
    assert len(ratings) == 8 and ratings.counts == (4, 4)
    assert torch.equal(ratings.images, from_pairs.images) and torch.equal(ratings.liked, from_pairs.liked)
    both = ImageRatings.concat([ratings, ratings])
    assert len(both) == 16 and both.counts == (8, 8) and both.prompts[8:] == ratings.prompts
    small = ImageRatings(["a"], torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="different sizes"):
        ImageRatings.concat([ratings, small])
    with pytest.raises(ValueError, match="3 prompts but 2 images"):
        ImageRatings(["a"] * 3, torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.ones(3, dtype=torch.bool))
