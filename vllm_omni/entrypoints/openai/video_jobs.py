"""Video jobs that survive a restart: one SQLite table of records and the outputs as files, both
in one storage directory (``--video-storage-dir``).

A record holds what re-runs its job (the validated request, its resolved seed, the input
reference as a lossless PNG beside it), so after the server is killed and started again on the
same directory, jobs that were queued or running run again and produce the same video. Files are
written to a temporary name, synced and renamed: a reader sees a whole video or none. One server
at a time holds the directory (an exclusive lock), so two servers never run each other's jobs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any

UNFINISHED = ("queued", "in_progress")


@dataclass
class VideoJob:
    id: str
    model: str
    prompt: str
    size: str
    seconds: str
    # What re-runs the job: the request's validated fields and its resolved seed.
    params: dict[str, Any]
    status: str = "queued"  # queued, in_progress, completed or failed
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict[str, str] | None = None
    has_reference: bool = False

    def public(self) -> dict[str, Any]:
        """The job as OpenAI's Videos API shows it (plus the seed that reproduces it)."""
        return {"id": self.id, "object": "video", "model": self.model, "status": self.status,
                "progress": self.progress, "created_at": self.created_at,
                "completed_at": self.completed_at, "expires_at": self.expires_at,
                "prompt": self.prompt, "size": self.size, "seconds": self.seconds,
                "quality": "standard", "remixed_from_video_id": None, "error": self.error,
                "vllm_omni": {"seed": self.params.get("seed")}}


class JobStore:
    def __init__(self, directory: str, retention_s: float):
        """Raises ``ValueError`` saying why when the directory cannot hold jobs (unwritable, or
        held by another server)."""
        self.directory, self.retention_s = os.path.abspath(directory), retention_s
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._lock = open(os.path.join(self.directory, ".lock"), "a")
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"video storage directory {self.directory} is in use by another "
                             "server; give each server its own --video-storage-dir") from None
        except OSError as e:
            raise ValueError(f"video storage directory {self.directory} is not usable: "
                             f"{e.strerror or e}") from None
        try:
            self.write_file(".probe", b"")  # writable, with room for a file: said now, not later
            os.remove(self.path(".probe"))
            for name in os.listdir(self.directory):  # a write cut short by the last shutdown
                if name.endswith(".tmp"):
                    os.remove(self.path(name))
            # One connection for the event loop and its worker threads: Python's sqlite3 is
            # built serialized (threadsafety 3), so calls from threads do not interleave.
            self.db = sqlite3.connect(self.path("jobs.sqlite3"), isolation_level=None,
                                      check_same_thread=False)
            # With a write-ahead log, a commit survives the process's death without waiting for
            # the disk (synchronous=NORMAL: only a power cut may lose the last commits).
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY "
                            "AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL, "
                            "expires_at INTEGER, record TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as e:
            raise ValueError(f"video storage directory {self.directory} is not writable: "
                             f"{getattr(e, 'strerror', None) or e}") from None

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def write_file(self, name: str, data: bytes) -> None:
        """Whole or not at all: a temporary file, synced, renamed over ``name``."""
        tmp = self.path(name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(name))
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def read_file(self, name: str) -> bytes | None:
        try:
            with open(self.path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    # -- records -----------------------------------------------------------------------------------
    def add(self, job: VideoJob) -> None:
        self.db.execute("INSERT INTO jobs (id, status, expires_at, record) VALUES (?, ?, ?, ?)",
                        (job.id, job.status, job.expires_at, json.dumps(asdict(job))))

    def save(self, job: VideoJob) -> None:
        self.db.execute("UPDATE jobs SET status = ?, expires_at = ?, record = ? WHERE id = ?",
                        (job.status, job.expires_at, json.dumps(asdict(job)), job.id))

    def get(self, job_id: str) -> VideoJob | None:
        row = self.db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return VideoJob(**json.loads(row[0])) if row else None

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[VideoJob], bool]:
        """A page of jobs in creation order (``asc``/``desc``) after the job ``after``, and
        whether more follow. Raises ``KeyError`` for an unknown ``after``."""
        where, args = "", []
        if after is not None:
            row = self.db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
            if row is None:
                raise KeyError(after)
            where, args = f"WHERE seq {'>' if order == 'asc' else '<'} ?", [row[0]]
        rows = self.db.execute(f"SELECT record FROM jobs {where} ORDER BY seq "
                               f"{'ASC' if order == 'asc' else 'DESC'} LIMIT ?",
                               (*args, limit + 1)).fetchall()
        return [VideoJob(**json.loads(r[0])) for r in rows[:limit]], len(rows) > limit

    def unfinished(self) -> list[VideoJob]:
        """Jobs a restart must run again, oldest first."""
        rows = self.db.execute("SELECT record FROM jobs WHERE status IN (?, ?) ORDER BY seq",
                               UNFINISHED).fetchall()
        return [VideoJob(**json.loads(r[0])) for r in rows]

    def delete(self, job_id: str) -> None:
        self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        for suffix in (".mp4", ".webp", ".png"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(job_id + suffix))

    def sweep(self) -> int:
        """Deletes expired jobs and their files; how many."""
        ids = [r[0] for r in self.db.execute(
            "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (time.time(),))]
        for job_id in ids:
            self.delete(job_id)
        return len(ids)

    def close(self) -> None:
        self.db.close()
        self._lock.close()
