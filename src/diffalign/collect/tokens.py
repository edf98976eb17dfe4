"""Rater and admin tokens: random, shown once, stored only as sha256.

A token is 32 random bytes, URL-safe base64 (43 characters). Looking one up hashes it and compares with
the stored hashes in the database (an index lookup on a uniformly random 256-bit value, so timing reveals
nothing useful); the admin token is compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Connection, delete, insert, select, update

from diffalign.collect.models import ADMIN_TOKEN_KEY
from diffalign.prefs.schema import Rater, StoreMeta

TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
NAME_PATTERN = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")  # raters.name is VARCHAR(200)
GROUP_PATTERN = re.compile(r"^[^\x00-\x1f\x7f]{1,100}$")  # raters.group is VARCHAR(100)


class TokenError(ValueError):
    """A rater or token request that cannot be carried out (named rater missing, bad name, ...)."""


@dataclass(frozen=True)
class Principal:
    """Who a request is from: the admin, or a rater (id, name)."""

    is_admin: bool
    rater_id: int | None = None
    rater_name: str | None = None


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_rater(conn: Connection, name: str, group: str | None = None, rotate: bool = False) -> str:
    """Create rater `name` with a fresh token (or, with `rotate`, replace an existing rater's token).

    A rater already in the store without a token (an imported dataset's user) gets one. Returns the
    token; only its hash is stored.
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name.strip() != name:
        raise TokenError(f"rater name {name!r}: 1 to 200 printable characters, no surrounding spaces")
    if group is not None and (
        not isinstance(group, str) or not GROUP_PATTERN.match(group) or group.strip() != group
    ):
        raise TokenError(f"rater group {group!r}: 1 to 100 printable characters, no surrounding spaces")
    token = new_token()
    row = conn.execute(select(Rater.id, Rater.token_sha256).where(Rater.name == name)).first()
    if row is None:
        conn.execute(
            insert(Rater).values(
                name=name, group=group, token_sha256=hash_token(token), created_at=datetime.now(timezone.utc)
            )
        )
    elif row.token_sha256 is not None and not rotate:
        raise TokenError(f"rater {name!r} already has a token; pass --rotate to replace it")
    else:
        values = {"token_sha256": hash_token(token)}
        if group is not None:
            values["group"] = group
        conn.execute(update(Rater).where(Rater.id == row.id).values(**values))
    return token


def revoke_rater(conn: Connection, name: str) -> None:
    """Remove rater `name`'s token (their votes stay in the store)."""
    result = conn.execute(update(Rater).where(Rater.name == name).values(token_sha256=None))
    if result.rowcount == 0:
        raise TokenError(f"no rater named {name!r}")


def set_admin_token(conn: Connection) -> str:
    """A new admin token (any previous one stops working); returns it."""
    token = new_token()
    conn.execute(delete(StoreMeta).where(StoreMeta.key == ADMIN_TOKEN_KEY))
    conn.execute(insert(StoreMeta).values(key=ADMIN_TOKEN_KEY, value=hash_token(token)))
    return token


def has_admin_token(conn: Connection) -> bool:
    return conn.execute(select(StoreMeta.value).where(StoreMeta.key == ADMIN_TOKEN_KEY)).first() is not None


def resolve(conn: Connection, token: str) -> Principal | None:
    """The principal a token belongs to, or None when it is no one's."""
    if not TOKEN_PATTERN.match(token):
        return None
    digest = hash_token(token)
    admin = conn.execute(select(StoreMeta.value).where(StoreMeta.key == ADMIN_TOKEN_KEY)).scalar()
    if admin is not None and hmac.compare_digest(admin, digest):
        return Principal(is_admin=True)
    row = conn.execute(select(Rater.id, Rater.name).where(Rater.token_sha256 == digest)).first()
    if row is None:
        return None
    return Principal(is_admin=False, rater_id=row.id, rater_name=row.name)
