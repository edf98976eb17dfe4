"""HPDv2 (Human Preference Dataset v2): JSON metadata with image files beside it.

train.json: [{"prompt", "file_path": [str, ...], "human_preference": [int, ...]}], one comparison of
len(file_path) images where exactly one entry of human_preference is 1 (the chosen image).

test.json: [{"prompt", "image_path": [str, ...], "rank": [int, ...],
"raw_annotations": [{"rank": [int, ...], "user_hash": str}, ...]}]: every annotator ranked all the
images (1 = best). Each annotator's ranking is expanded into every pair of images, a two-image
comparison per pair (the better-ranked image chosen, equal ranks a tie), rater `hpdv2:<user_hash>`:
that keeps the whole ranking, in the store's own terms, and is how HPDv2 scores pairwise accuracy.
An entry without raw_annotations (or with an empty list) expands its aggregate `rank` the same way with
no rater.

The JSON is parsed one entry at a time (`iter_json_array`), never whole; images are read per entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from diffalign.prefs.formats._common import checked, image_problem
from diffalign.prefs.records import CHOICE_IMAGE, CHOICE_TIE, BadRow, NewComparison

SOURCE = "hpdv2"
_CHUNK = 1 << 20
_WS = re.compile(r"\s*")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that did not decode, under errors="surrogateescape"


class JSONArrayError(ValueError):
    """The text of a JSON array file is not a JSON array from `where` on (the rest is not read)."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


def iter_json_array(path: Path, chunk_size: int = _CHUNK) -> Iterator[object]:
    """The elements of a JSON array file (UTF-8, with or without a byte order mark), decoded one at a
    time from chunks of the file.

    Raises JSONArrayError (a ValueError) naming the entry when the text is not a JSON array.
    """
    decoder = json.JSONDecoder()
    index = 0
    # A byte that is not UTF-8 becomes a lone surrogate, so the entries before it are still read.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        buf, pos, eof = "", 0, False

        def more() -> None:
            nonlocal buf, pos, eof
            chunk = f.read(chunk_size)
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk

        def check_utf8(start: int, end: int) -> None:
            invalid = _NOT_UTF8.search(buf, start, end)
            if invalid is not None:
                byte = ord(invalid.group()) - 0xDC00
                raise JSONArrayError(f"{path.name} entry {index}", f"not UTF-8 text (byte {byte:#04x})")

        def skip_ws() -> bool:
            """Move past whitespace; False at the end of the file."""
            nonlocal pos
            while True:
                pos = _WS.match(buf, pos).end()
                if pos < len(buf):
                    return True
                if eof:
                    return False
                more()

        if not skip_ws():
            raise JSONArrayError(path.name, "the file is empty (expected a JSON array)")
        if buf[pos] != "[":
            raise JSONArrayError(path.name, f"not a JSON array (it must start with '[', not {buf[pos]!r})")
        pos += 1
        if skip_ws() and buf[pos] == "]":
            return
        while True:
            if not skip_ws():
                raise JSONArrayError(f"{path.name} entry {index}", "the file ends inside the array")
            try:
                value, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:
                    raise json.JSONDecodeError("may continue", buf, end)
            except json.JSONDecodeError as err:
                if not eof:
                    more()
                    continue
                check_utf8(pos, err.pos + 1)
                raise JSONArrayError(f"{path.name} entry {index}", f"not valid JSON ({err.msg})") from err
            check_utf8(pos, end)
            yield value
            index += 1
            pos = end
            if not skip_ws():
                raise JSONArrayError(f"{path.name} entry {index}", "the file ends inside the array")
            if buf[pos] == ",":
                pos += 1
            elif buf[pos] == "]":
                return
            else:
                raise JSONArrayError(
                    f"{path.name} entry {index}", f"expected ',' or ']' after entry {index - 1}"
                )


def read_hpdv2(
    path: str | Path, *, source: str | None = None, images_dir: str | Path | None = None
) -> Iterator[NewComparison | BadRow]:
    """Comparisons from an HPDv2 train.json or test.json (the layout is told entry by entry).

    Args:
        path: the JSON file.
        source: the comparisons' source (default 'hpdv2').
        images_dir: the folder image paths are relative to (default: the JSON file's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    base = Path(images_dir) if images_dir is not None else path.parent
    entries = iter_json_array(path)
    index = 0
    while True:
        where = f"{path.name} entry {index}"
        try:
            entry = next(entries)
        except StopIteration:
            return
        except JSONArrayError as err:  # the rest of the file cannot be parsed
            yield BadRow(err.where, err.reason)
            return
        if not isinstance(entry, dict):
            yield BadRow(where, f"an entry must be a JSON object, got {type(entry).__name__}")
        elif "human_preference" in entry:
            yield _train(where, entry, base, source or SOURCE)
        elif "rank" in entry or "raw_annotations" in entry:
            yield from _test(where, entry, base, source or SOURCE)
        else:
            yield BadRow(where, "neither a train entry (human_preference) nor a test entry (rank)")
        index += 1


def _images(entry: dict, field: str, base: Path) -> list[bytes] | str:
    """The entry's image files' bytes, or why they cannot be read."""
    paths = entry.get(field)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return f"{field} must be a list of paths"
    if len(paths) < 2:
        return f"{field} names {len(paths)} image(s); a comparison needs two or more"
    images = []
    for i, rel in enumerate(paths):
        file = base / rel
        try:
            images.append(file.read_bytes())
        except FileNotFoundError:
            return f"image {i} ({rel}) not found in {base}"
        except OSError as err:
            return f"image {i} ({rel}) cannot be read: {err}"
    return images


def _int_list(value: object, n: int, field: str) -> list[int] | str:
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return f"{field} must be a list of {n} integers, got {value!r}"
    return value


def _train(where: str, entry: dict, base: Path, source: str) -> NewComparison | BadRow:
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        return BadRow(where, "prompt missing or not text")
    paths = entry.get("file_path")
    n = len(paths) if isinstance(paths, list) else -1
    prefs = _int_list(entry.get("human_preference"), n, "human_preference")
    if isinstance(prefs, str):
        return BadRow(where, prefs if n >= 0 else "file_path must be a list of paths")
    ones = [i for i, v in enumerate(prefs) if v == 1]
    if len(ones) != 1 or any(v not in (0, 1) for v in prefs):
        return BadRow(where, f"human_preference must hold exactly one 1 and otherwise 0, got {prefs}")
    images = _images(entry, "file_path", base)
    if isinstance(images, str):
        return BadRow(where, images)
    return checked(
        NewComparison(
            prompt=prompt,
            images=images,
            choice=CHOICE_IMAGE,
            chosen=ones[0],
            source=source,
            meta={"split": "train"},
            image_meta=[{"path": p} for p in paths],
            where=where,
        )
    )


def _test(where: str, entry: dict, base: Path, source: str) -> Iterator[NewComparison | BadRow]:
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        yield BadRow(where, "prompt missing or not text")
        return
    paths = entry.get("image_path")
    if not isinstance(paths, list):
        yield BadRow(where, "image_path must be a list of paths")
        return
    annotations = entry.get("raw_annotations")
    rankings: list[tuple[str | None, list[int], str]] = []
    if annotations is None or annotations == []:  # no annotator's ranking: the aggregate one
        rank = _int_list(entry.get("rank"), len(paths), "rank")
        if isinstance(rank, str):
            yield BadRow(where, rank)
            return
        rankings.append((None, rank, where))
    elif not isinstance(annotations, list):
        yield BadRow(where, "raw_annotations must be a list")
        return
    else:
        for a, note in enumerate(annotations):
            here = f"{where} annotation {a}"
            rank = _int_list(note.get("rank") if isinstance(note, dict) else None, len(paths), "rank")
            user = note.get("user_hash") if isinstance(note, dict) else None
            if isinstance(rank, str):
                yield BadRow(here, rank)
            elif not isinstance(user, str) or not user:
                yield BadRow(here, "user_hash missing or not text")
            else:
                rankings.append((f"hpdv2:{user}", rank, here))
    if not rankings:
        return
    images = _images(entry, "image_path", base)
    if isinstance(images, str):
        yield BadRow(where, images)
        return
    for i, data in enumerate(images):  # checked once here, not once per pair
        reason = image_problem(data)
        if reason is not None:
            yield BadRow(where, f"image {i} ({paths[i]}): {reason}")
            return
    for rater, rank, here in rankings:
        meta = {"split": "test", "rank": rank, "aggregated": rater is None}
        for x in range(len(paths)):
            for y in range(x + 1, len(paths)):
                if rank[x] == rank[y]:
                    choice, chosen = CHOICE_TIE, None
                else:
                    choice, chosen = CHOICE_IMAGE, (0 if rank[x] < rank[y] else 1)
                yield checked(
                    NewComparison(
                        prompt=prompt,
                        images=[images[x], images[y]],
                        choice=choice,
                        chosen=chosen,
                        rater=rater,
                        source=source,
                        meta={**meta, "positions": [x, y]},
                        image_meta=[{"path": paths[x]}, {"path": paths[y]}],
                        where=f"{here} pair ({x}, {y})",
                    ),
                    check_images=False,
                )
