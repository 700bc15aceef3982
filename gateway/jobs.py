"""Async batch jobs: progress and results of batches run in the background.

Jobs live in memory (bounded, oldest finished first out). A job's *records* are in the
journal like any others; what a restart loses is only the progress report, and re-sending
the same batch (same ``id``) returns the stored records without signing anything twice.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from gateway.core.errors import NotFound


@dataclass(slots=True)
class Job:
    job_id: str
    key: tuple[str, str]
    total: int
    status: str = "queued"  # queued → processing → completed | failed
    processed: int = 0
    successful: int = 0
    failed: int = 0
    started_at: str | None = None
    completed_at: str | None = None
    batch: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        pct = round(100.0 * self.processed / self.total, 1) if self.total else 100.0
        out: dict[str, Any] = {
            "jobId": self.job_id,
            "status": self.status,
            "progress": {
                "total": self.total,
                "processed": self.processed,
                "successful": self.successful,
                "failed": self.failed,
                "percentComplete": pct,
            },
            "startedAt": self.started_at,
            "completedAt": self.completed_at,
        }
        if self.batch is not None:
            out["batch"] = self.batch
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(slots=True)
class JobRegistry:
    max_jobs: int = 1000
    _jobs: dict[str, Job] = field(default_factory=dict)
    _by_key: dict[tuple[str, str], str] = field(default_factory=dict)

    def find(self, key: tuple[str, str]) -> Job | None:
        job_id = self._by_key.get(key)
        return self._jobs.get(job_id) if job_id else None

    def create(self, key: tuple[str, str], total: int) -> Job:
        self._evict()
        job = Job("job_" + secrets.token_hex(16), key, total)
        self._jobs[job.job_id] = job
        self._by_key[key] = job.job_id
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id} (jobs are kept in memory until restart)")
        return job

    def active(self) -> int:
        return sum(1 for j in self._jobs.values() if j.status in ("queued", "processing"))

    def _evict(self) -> None:
        while len(self._jobs) >= self.max_jobs:
            done = [j for j in self._jobs.values() if j.status in ("completed", "failed")]
            if not done:
                return
            victim = done[0]
            del self._jobs[victim.job_id]
            self._by_key.pop(victim.key, None)
