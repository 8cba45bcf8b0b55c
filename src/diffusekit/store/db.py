"""The store's metadata in SQLite (WAL, synchronous=FULL) and the lock file that serializes writers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    current INTEGER,                 -- the version NAME resolves to; NULL once every version is removed
    next_version INTEGER NOT NULL,   -- version numbers are never reused
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES models(name),
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    command TEXT NOT NULL,
    source TEXT, license TEXT, note TEXT,
    parent TEXT,                     -- NAME@VERSION this one derives from, if known
    manifest TEXT NOT NULL,          -- JSON: components by blob sha256, hashes of the original file, ...
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS goldens (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    record TEXT NOT NULL,            -- JSON GoldenRecord
    PRIMARY KEY (name, version),
    FOREIGN KEY (name, version) REFERENCES versions(name, version)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    at REAL NOT NULL,
    action TEXT NOT NULL,            -- add | promote | rollback | remove | golden
    from_version INTEGER,
    to_version INTEGER,
    reason TEXT,
    actor TEXT NOT NULL
);
"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal, full fsync."""
    conn = sqlite3.connect(os.fspath(path), timeout=60.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def store_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` for the length of one store command (released on exit or crash)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock
