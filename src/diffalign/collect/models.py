"""The collection app's tables, on the preference store's metadata (same database, same engine).

collect_tasks ─< collect_assignments >─ raters
     │                   │
     └ images (a, b)     └ comparisons (by key, once answered)

A task is a pair of stored images for a prompt that `raters_needed` different raters should label. A rater's
queue is built lazily: asking for the next pair claims a slot on the open task with the highest
priority (ensemble disagreement in active mode) that this rater has not seen, so raters added later get
work too. An assignment is answered once: the vote writes its comparison (key
`collect:<task>:<rater>`) and marks the assignment in one transaction.

The admin token's sha256 lives in `store_meta` under ADMIN_TOKEN_KEY; rater tokens' sha256 in
`raters.token_sha256`. No token is stored in the clear.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from diffalign.prefs.schema import Base

ADMIN_TOKEN_KEY = "collect_admin_token_sha256"


class CollectTask(Base):
    """A pair of images for a prompt, to be labelled by `raters_needed` raters."""

    __tablename__ = "collect_tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    image_a: Mapped[str] = mapped_column(String(64), ForeignKey("images.sha256"))
    image_b: Mapped[str] = mapped_column(String(64), ForeignKey("images.sha256"))
    raters_needed: Mapped[int] = mapped_column(Integer)
    # Raters given this task so far (claimed or answered); a claim is one conditional UPDATE
    # (assigned = assigned + 1 WHERE assigned < raters_needed), atomic on SQLite and PostgreSQL alike.
    assigned: Mapped[int] = mapped_column(Integer, default=0)
    # Higher first; active mode stores the ensemble's disagreement, plain mode 0 (then oldest first).
    priority: Mapped[float] = mapped_column(Float, default=0.0)
    batch: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    meta: Mapped[dict] = mapped_column(JSON, default=dict)

    __table_args__ = (
        UniqueConstraint("batch", "prompt_id", "image_a", "image_b", name="uq_collect_task_pair"),
        Index("ix_collect_tasks_open", "assigned", "priority", "id"),
    )


class CollectAssignment(Base):
    """One rater's slot on one task: claimed when shown, answered once."""

    __tablename__ = "collect_assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("collect_tasks.id"))
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"))
    # Display order: False shows image_a on the left. Drawn at random per assignment against position bias.
    swapped: Mapped[bool] = mapped_column(Boolean, default=False)
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # 'a', 'b' (the task's image preferred, whatever side it was shown on), 'tie' or 'skip'.
    outcome: Mapped[str | None] = mapped_column(String(8), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    comparison_key: Mapped[str | None] = mapped_column(String(255), nullable=True)

    __table_args__ = (
        UniqueConstraint("task_id", "rater_id", name="uq_collect_assignment_task_rater"),
        UniqueConstraint("rater_id", "idempotency_key", name="uq_collect_assignment_idempotency"),
        Index("ix_collect_assignments_rater", "rater_id", "answered_at"),
    )


COLLECT_TABLES = [CollectTask.__table__, CollectAssignment.__table__]
