"""What the harness records of a worker process, shared by ``harness`` (which runs them) and ``report``
(which reads them)."""

from __future__ import annotations

from dataclasses import dataclass

CONTENTION = 0.25  # CPU cores used by other processes above which a worker's timings are suspect


@dataclass
class WorkerRun:
    """What the harness saw of one worker process."""

    name: str
    result: dict  # the worker's own result file (possibly partial)
    returncode: int | None
    wall_s: float
    error: str | None = None  # why the worker did not finish (kill reason, traceback tail)
    other_cpu_cores: float = 0.0  # mean CPU cores used by other processes meanwhile
    max_rss_mb: float = 0.0  # the harness's own sampling of the worker's RSS
    cached: bool = False
    waited_s: float = 0.0  # waiting for other processes to go quiet before the (last) attempt
    attempts: int = 1
    memory_guard: bool = False  # stopped by the memory guard

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> dict:
        return {"wall_s": self.wall_s, "returncode": self.returncode, "error": self.error,
                "other_cpu_cores": self.other_cpu_cores, "sampled_max_rss_mb": self.max_rss_mb,
                "cached": self.cached, "waited_for_idle_s": self.waited_s, "attempts": self.attempts}
