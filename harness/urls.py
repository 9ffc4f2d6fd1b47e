"""Store URLs: the file behind a SQLite URL, relative SQLite paths made absolute, passwords hidden, drivers
that are missing."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

SQLITE = "sqlite:///"
POSTGRES_EXTRA = "pip install -e '.[postgres]'"


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URL; None for any other URL."""
    return Path(url.removeprefix(SQLITE)) if url.startswith(SQLITE) else None


def absolute_url(url: str) -> str:
    """A SQLite URL with its path made absolute (independent of a later working directory); others as given."""
    path = sqlite_path(url)
    return url if path is None or path.is_absolute() else SQLITE + str(path.resolve())


def display_url(url: str) -> str:
    """A URL without its password, fit for tags and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a database URL (e.g. http://): nothing to hide
        return url


def missing_driver(url: str) -> str | None:
    """What is wrong when the Python database driver a URL needs is not installed; None when it imports, or
    when `url` is no database URL SQLAlchemy knows (other checks say so)."""
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except ArgumentError:  # also an unknown dialect (NoSuchModuleError)
        return None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        problem = f"{parsed.drivername}:// needs the Python module '{err.name}', which is not installed"
        if parsed.get_backend_name() == "postgresql":  # SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3
            problem += f": use postgresql+psycopg2:// after {POSTGRES_EXTRA}"
        return problem
    return None
