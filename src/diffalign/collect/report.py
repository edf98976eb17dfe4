"""What the admin page shows: counts and per-rater agreement.

Agreement is pairwise, over tasks answered by two or more raters: for every two raters' answers on the
same task (skips left out), they agree when they picked the same image or both called it a tie. A
rater's agreement is the fraction of their answer pairs (their answer against each other rater's on the
same tasks) that agree; the overall figure pools every pair once. None where there is no pair yet.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import func, select

from diffalign.collect.models import CollectAssignment, CollectTask
from diffalign.collect.storage import read_connection
from diffalign.prefs.schema import Prompt, Rater
from diffalign.prefs.store import PreferenceStore


def pairwise_agreement(
    answers: Iterable[tuple[int, str, str]],
) -> tuple[dict[str, float | None], float | None]:
    """(per rater, overall) agreement from (task, rater, outcome) answers; outcome 'a'|'b'|'tie'|'skip'."""
    by_task: dict[int, list[tuple[str, str]]] = defaultdict(list)
    raters: set[str] = set()
    for task, rater, outcome in answers:
        raters.add(rater)
        if outcome != "skip":
            by_task[task].append((rater, outcome))
    agree: dict[str, int] = defaultdict(int)
    seen: dict[str, int] = defaultdict(int)
    total_agree = total = 0
    for votes in by_task.values():
        for i in range(len(votes)):
            for j in range(i + 1, len(votes)):
                same = int(votes[i][1] == votes[j][1])
                for rater in (votes[i][0], votes[j][0]):
                    agree[rater] += same
                    seen[rater] += 1
                total_agree += same
                total += 1
    per_rater = {r: (agree[r] / seen[r] if seen[r] else None) for r in sorted(raters)}
    return per_rater, (total_agree / total if total else None)


def overview(store: PreferenceStore, recent: int = 20) -> dict:
    """Counts of tasks and votes, per-rater progress and agreement, and the most recent answers."""
    with read_connection(store) as conn:
        assigned = (
            select(CollectAssignment.task_id, func.count(CollectAssignment.id).label("n"))
            .where(CollectAssignment.answered_at.is_not(None))
            .group_by(CollectAssignment.task_id)
            .subquery()
        )
        tasks = conn.execute(select(func.count(CollectTask.id))).scalar_one()
        complete = conn.execute(
            select(func.count(CollectTask.id))
            .join(assigned, assigned.c.task_id == CollectTask.id)
            .where(assigned.c.n >= CollectTask.raters_needed)
        ).scalar_one()
        slots = conn.execute(select(func.coalesce(func.sum(CollectTask.raters_needed), 0))).scalar_one()
        rows = conn.execute(
            select(
                Rater.name,
                Rater.group,
                Rater.token_sha256.is_not(None),
                CollectAssignment.task_id,
                CollectAssignment.outcome,
                CollectAssignment.answered_at,
            ).outerjoin(CollectAssignment, CollectAssignment.rater_id == Rater.id)
        ).all()
        latest = conn.execute(
            select(Rater.name, Prompt.text, CollectAssignment.outcome, CollectAssignment.answered_at)
            .join(Rater, Rater.id == CollectAssignment.rater_id)
            .join(CollectTask, CollectTask.id == CollectAssignment.task_id)
            .join(Prompt, Prompt.id == CollectTask.prompt_id)
            .where(CollectAssignment.answered_at.is_not(None))
            .order_by(CollectAssignment.answered_at.desc(), CollectAssignment.id.desc())
            .limit(recent)
        ).all()
    raters: dict[str, dict] = {}
    answers = []
    for name, group, active, task, outcome, answered_at in rows:
        entry = raters.setdefault(
            name,
            {"name": name, "group": group, "active": bool(active), "answered": 0, "skipped": 0, "open": 0},
        )
        if task is None:
            continue
        if answered_at is None:
            entry["open"] += 1
            continue
        entry["answered"] += 1
        entry["skipped"] += outcome == "skip"
        answers.append((task, name, outcome))
    per_rater, overall = pairwise_agreement(answers)
    for name, entry in raters.items():
        entry["agreement"] = per_rater.get(name)
    votes = sum(entry["answered"] for entry in raters.values())
    return {
        "tasks": int(tasks),
        "tasks_complete": int(complete),
        "votes": int(votes),
        "votes_needed": int(slots),
        "agreement": overall,
        "raters": [raters[n] for n in sorted(raters) if raters[n]["active"] or raters[n]["answered"]],
        "recent": [
            {"rater": name, "prompt": text, "outcome": outcome, "at": at.isoformat()}
            for name, text, outcome, at in latest
        ],
    }
