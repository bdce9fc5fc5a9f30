"""Translate between the URLs users write, libpq's, and SQLAlchemy's (psycopg 3 driver)."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url


def sqlalchemy_url(url: str, *, database: str | None = None) -> URL:
    """``postgresql://…`` (or ``postgres://``) as a SQLAlchemy URL on the psycopg 3 driver."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    parsed = parsed.set(drivername="postgresql+psycopg")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed


def libpq_url(url: str, *, database: str | None = None) -> str:
    """The same server as a plain libpq URL, for psycopg's own ``connect``."""
    parsed = sqlalchemy_url(url, database=database).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)
