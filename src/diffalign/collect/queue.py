"""The labelling queue: pairs in, one claimed pair per rater out, votes into the preference store.

Every function here is one transaction (`storage.write_transaction`), so a vote either lands whole (its
comparison in the store and its assignment marked answered) or not at all, and a server killed at any
point loses no committed vote and half-writes none.
"""

from __future__ import annotations

import json
import math
import numbers
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import Connection, Row, and_, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from diffalign.collect.models import CollectAssignment, CollectTask
from diffalign.collect.storage import read_connection, write_transaction
from diffalign.prefs.records import CHOICE_IMAGE, CHOICE_SKIP, CHOICE_TIE, NewComparison
from diffalign.prefs.schema import Prompt, Rater
from diffalign.prefs.store import PreferenceStore

SOURCE = "collect"
VOTES = ("left", "right", "tie", "skip")
_BATCH_CHARS = 100  # collect_tasks.batch is VARCHAR(100)
_CANDIDATES = 20  # open tasks looked at per claim (more than enough: a full one is skipped, rarely)


class QueueError(Exception):
    """A request the queue refuses; `status` is the HTTP status that says why."""

    status = 400


class NotFoundError(QueueError):
    status = 404


class ForbiddenError(QueueError):
    status = 403


class ConflictError(QueueError):
    status = 409


@dataclass
class PairTask:
    """A pair to queue: a prompt and two encoded images (PNG bytes), with a priority (higher first)."""

    prompt: str
    image_a: bytes
    image_b: bytes
    priority: float = 0.0
    meta: dict = field(default_factory=dict)
    image_meta: tuple[dict, dict] = ({}, {})


@dataclass(frozen=True)
class Shown:
    """A claimed pair as the rater sees it."""

    assignment_id: int
    prompt: str
    left: str  # sha256 of the image shown on the left
    right: str


@dataclass(frozen=True)
class Progress:
    answered: int
    remaining: int

    @property
    def total(self) -> int:
        return self.answered + self.remaining


def _now() -> datetime:
    return datetime.now(timezone.utc)


def add_pairs(store: PreferenceStore, pairs: Iterable[PairTask], raters_needed: int, batch: str) -> int:
    """Queue pairs, each for `raters_needed` different raters; returns how many were new.

    Images go into the store (content-addressed); a pair already queued in `batch` (the same prompt and
    images, in either order) is not queued again, and a pair of two identical images is refused (there is
    nothing to choose). A pair with a prompt that is not text, a priority that is not a finite number or
    meta that is not JSON is refused with ValueError before anything is written.
    """
    if raters_needed < 1:
        raise ValueError(f"raters per pair must be at least 1, got {raters_needed}")
    if not isinstance(batch, str) or not 1 <= len(batch) <= _BATCH_CHARS:
        raise ValueError(f"batch name must be 1 to {_BATCH_CHARS} characters, got {batch!r}")
    added = 0
    with write_transaction(store) as (conn, writer):
        for n, pair in enumerate(pairs):
            problem = _pair_problem(pair)
            if problem:
                raise ValueError(f"pair {n}: {problem}")
            try:
                a = writer.image(pair.image_a, pair.image_meta[0])
                b = writer.image(pair.image_b, pair.image_meta[1])
            except ValueError as err:
                raise ValueError(f"pair {n} ({pair.prompt!r}): {err}") from err
            if a == b:
                raise ValueError(f"pair {n} ({pair.prompt!r}): both images are the same file")
            prompt_id = writer.prompt(pair.prompt)
            # The same two images in either order are the same pair (the page draws the order anyway).
            existing = conn.execute(
                select(CollectTask.id).where(
                    CollectTask.batch == batch,
                    CollectTask.prompt_id == prompt_id,
                    or_(
                        and_(CollectTask.image_a == a, CollectTask.image_b == b),
                        and_(CollectTask.image_a == b, CollectTask.image_b == a),
                    ),
                )
            ).first()
            if existing is not None:
                continue
            conn.execute(
                insert(CollectTask).values(
                    prompt_id=prompt_id,
                    image_a=a,
                    image_b=b,
                    raters_needed=raters_needed,
                    assigned=0,
                    priority=float(pair.priority),
                    batch=batch,
                    created_at=_now(),
                    meta=pair.meta,
                )
            )
            added += 1
    return added


def _pair_problem(pair: PairTask) -> str | None:
    """Why a pair cannot be queued (before anything is written), or None. Checked here because a vote
    copies the prompt and priority into its comparison, which the store refuses when they are not text
    and finite JSON numbers: a bad pair would otherwise fail every vote on it."""
    if not isinstance(pair.prompt, str):
        return f"prompt must be text, got {type(pair.prompt).__name__}"
    if "\x00" in pair.prompt:
        return "prompt has a NUL character (PostgreSQL text cannot hold one)"
    if isinstance(pair.priority, bool) or not isinstance(pair.priority, numbers.Real):
        return f"priority must be a number, got {pair.priority!r}"
    if not math.isfinite(pair.priority):
        return f"priority must be finite, got {pair.priority} (an ensemble's disagreement came out NaN?)"
    if not isinstance(pair.meta, dict) or len(pair.image_meta) != 2:
        return "meta must be a dict and image_meta two dicts"
    try:  # strict JSON, as the store's JSON columns need on PostgreSQL
        json.dumps([pair.meta, *pair.image_meta], allow_nan=False)
    except (TypeError, ValueError) as err:
        return f"meta is not JSON: {err}"
    return None


def _available(rater_id: int):
    """Open tasks this rater has not been given: fewer assignments than raters needed."""
    mine = exists().where(CollectAssignment.task_id == CollectTask.id, CollectAssignment.rater_id == rater_id)
    return and_(CollectTask.assigned < CollectTask.raters_needed, ~mine)


def _shown(conn: Connection, assignment: Row) -> Shown:
    """The pair of an assignment (a row of collect_assignments) as its rater sees it."""
    a, b, text = conn.execute(
        select(CollectTask.image_a, CollectTask.image_b, Prompt.text)
        .join(Prompt, Prompt.id == CollectTask.prompt_id)
        .where(CollectTask.id == assignment.task_id)
    ).one()
    left, right = (b, a) if assignment.swapped else (a, b)
    return Shown(assignment.id, text, left, right)


def next_pair(store: PreferenceStore, rater_id: int, rng: random.Random | None = None) -> Shown | None:
    """The rater's current pair: the one they were shown and have not answered, else a new claim on
    the open task with the highest priority; None when nothing is left for them."""
    rng = rng or random.Random()
    with write_transaction(store) as (conn, _):
        open_one = conn.execute(
            select(CollectAssignment)
            .where(CollectAssignment.rater_id == rater_id, CollectAssignment.answered_at.is_(None))
            .order_by(CollectAssignment.id)
            .limit(1)
        ).first()
        if open_one is not None:
            return _shown(conn, open_one)
        candidates = conn.execute(
            select(CollectTask.id)
            .where(_available(rater_id))
            .order_by(CollectTask.priority.desc(), CollectTask.id)
            .limit(_CANDIDATES)
        ).scalars()
        for task_id in list(candidates):
            # Take a slot only if one is still free: another rater may have taken the last one since the
            # query above (PostgreSQL re-checks the condition on the row it locks for the update).
            taken = conn.execute(
                update(CollectTask)
                .where(CollectTask.id == task_id, CollectTask.assigned < CollectTask.raters_needed)
                .values(assigned=CollectTask.assigned + 1)
            ).rowcount
            if taken != 1:
                continue
            assignment_id = conn.execute(
                insert(CollectAssignment)
                .values(task_id=task_id, rater_id=rater_id, swapped=rng.random() < 0.5, claimed_at=_now())
                .returning(CollectAssignment.id)
            ).scalar_one()
            return _shown(conn, _assignment(conn, assignment_id))
    return None


def _assignment(conn: Connection, assignment_id: int, lock: bool = False) -> Row | None:
    query = select(CollectAssignment).where(CollectAssignment.id == assignment_id)
    return conn.execute(query.with_for_update() if lock else query).first()


def record_vote(
    store: PreferenceStore, rater_id: int, assignment_id: int, vote: str, idempotency_key: str
) -> str:
    """Record a rater's vote on one of their assignments; returns 'recorded' or 'duplicate'.

    One transaction writes the comparison (source 'collect', key `collect:<task>:<rater>`, the images in
    display order, so 'left' is chosen index 0) and marks the assignment answered. The same vote sent
    again with the same idempotency key (a double click, a retry after a lost response) is a
    'duplicate' and writes nothing; a different key, or a different vote under the same key, for an
    answered assignment is a conflict.

    Raises:
        NotFoundError: no such assignment. ForbiddenError: it is another rater's.
        ConflictError: already answered under another key or with another vote, or the key was used for
            another assignment.
    """
    if vote not in VOTES:
        raise QueueError(f"vote must be one of {VOTES}, got {vote!r}")
    try:
        with write_transaction(store) as (conn, writer):
            assignment = _assignment(conn, assignment_id, lock=True)
            if assignment is None:
                raise NotFoundError(f"no assignment {assignment_id}")
            if assignment.rater_id != rater_id:
                raise ForbiddenError(f"assignment {assignment_id} is not yours")
            # The outcome names the task's image, whichever side it was shown on.
            picked_a = (vote == "left") != assignment.swapped
            outcome = vote if vote in ("tie", "skip") else ("a" if picked_a else "b")
            if assignment.answered_at is not None:
                if assignment.idempotency_key != idempotency_key:
                    raise ConflictError(f"assignment {assignment_id} is already answered")
                if assignment.outcome != outcome:
                    # A retry repeats its vote; another vote under the same key is not a retry.
                    raise ConflictError(
                        f"assignment {assignment_id} was already answered with another vote under this key"
                    )
                return "duplicate"
            shown = _shown(conn, assignment)
            task = conn.execute(select(CollectTask).where(CollectTask.id == assignment.task_id)).one()
            rater = conn.execute(select(Rater.name, Rater.group).where(Rater.id == rater_id)).one()
            choice = {"tie": CHOICE_TIE, "skip": CHOICE_SKIP}.get(vote, CHOICE_IMAGE)
            chosen = {"left": 0, "right": 1}.get(vote)
            key = f"collect:{task.id}:{rater_id}"
            writer.comparison(
                NewComparison(
                    prompt=shown.prompt,
                    images=[store.image_bytes(shown.left), store.image_bytes(shown.right)],
                    choice=choice,
                    chosen=chosen,
                    rater=rater.name,
                    rater_group=rater.group,
                    source=SOURCE,
                    key=key,
                    meta={
                        "task": task.id,
                        "batch": task.batch,
                        "assignment": assignment.id,
                        "idempotency_key": idempotency_key,
                        "swapped": assignment.swapped,
                        **({"priority": task.priority} if task.priority else {}),
                    },
                    where=f"assignment {assignment.id}",
                )
            )
            conn.execute(
                update(CollectAssignment)
                .where(CollectAssignment.id == assignment.id)
                .values(
                    answered_at=_now(), outcome=outcome, idempotency_key=idempotency_key, comparison_key=key
                )
            )
    except IntegrityError as err:
        raise ConflictError(f"idempotency key {idempotency_key!r} was already used for another vote") from err
    return "recorded"


def progress(store: PreferenceStore, rater_id: int) -> Progress:
    """How many pairs the rater has answered, and how many are left for them (claimed or claimable)."""
    with read_connection(store) as conn:
        answered = conn.execute(
            select(func.count(CollectAssignment.id)).where(
                CollectAssignment.rater_id == rater_id, CollectAssignment.answered_at.is_not(None)
            )
        ).scalar_one()
        claimed = conn.execute(
            select(func.count(CollectAssignment.id)).where(
                CollectAssignment.rater_id == rater_id, CollectAssignment.answered_at.is_(None)
            )
        ).scalar_one()
        open_tasks = conn.execute(select(func.count(CollectTask.id)).where(_available(rater_id))).scalar_one()
    return Progress(int(answered), int(claimed + open_tasks))


def may_see_image(store: PreferenceStore, rater_id: int, sha256: str) -> bool:
    """Whether the rater was given a pair showing this image (raters see only their own queue)."""
    with read_connection(store) as conn:
        row = conn.execute(
            select(CollectAssignment.id)
            .join(CollectTask, CollectTask.id == CollectAssignment.task_id)
            .where(
                CollectAssignment.rater_id == rater_id,
                (CollectTask.image_a == sha256) | (CollectTask.image_b == sha256),
            )
            .limit(1)
        ).first()
    return row is not None
