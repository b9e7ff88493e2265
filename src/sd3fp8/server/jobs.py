"""The prompt queue and history, ComfyUI's shapes (execution.py PromptQueue, v0.8.0).

A heap on (number, arrival), so equal numbers run first come first served; `front` prompts get
negative numbers. One job runs at a time; finished jobs go to a capped, insertion-ordered history.
Thread-safe: the HTTP handlers and the worker thread share it; ``on_change`` (the status broadcast,
which only queues a message) is called under the lock so statuses go out in the order of changes. Entries are never modified after
they are stored, so readers get them without copies.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sd3fp8.workflow.executor import ExecutionOutcome


class QueueFull(Exception):
    """More prompts are pending than --max-queue allows."""


@dataclass(order=True)
class Job:
    number: float
    seq: int
    prompt_id: str = field(compare=False)
    prompt: dict = field(compare=False)
    extra_data: dict = field(compare=False)
    outputs: list[str] = field(compare=False)

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")

    def item(self) -> list:
        """ComfyUI's queue item `[number, prompt_id, prompt, extra_data, outputs_to_execute]`."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptQueue:
    def __init__(self, max_pending: int, max_history: int, on_change: Callable[[], None] = lambda: None):
        self.max_pending = max_pending
        self.max_history = max_history
        self.on_change = on_change
        self._lock = threading.RLock()
        self._not_empty = threading.Condition(self._lock)
        self._heap: list[Job] = []
        self._running: Job | None = None
        self._history: dict[str, dict] = {}
        self._counter = 0  # ComfyUI's server.number: the next default priority
        self._seq = itertools.count()

    def number_for(self, number, front: bool) -> float | int:
        """ComfyUI's priority rule: an explicit `number`, else the counter (negated for `front`)."""
        with self._lock:
            if number is not None:
                return float(number)
            value = self._counter
            self._counter += 1
            return -value if front else value

    def put(self, prompt_id: str, number: float, prompt: dict, extra_data: dict, outputs: list[str]) -> Job:
        with self._lock:
            if len(self._heap) >= self.max_pending:
                raise QueueFull(f"the queue holds {len(self._heap)} prompts (--max-queue {self.max_pending})")
            job = Job(number, next(self._seq), prompt_id, prompt, extra_data, outputs)
            heapq.heappush(self._heap, job)
            self.on_change()  # under the lock: this status goes out before the worker's
            self._not_empty.notify()
        return job

    def get(self, timeout: float | None = None) -> Job | None:
        """The next job (now running), or None after ``timeout`` seconds without one."""
        with self._not_empty:
            if not self._heap and not self._not_empty.wait_for(lambda: self._heap, timeout):
                return None
            job = heapq.heappop(self._heap)
            self._running = job
            self.on_change()
        return job

    def task_done(self, job: Job, outcome: ExecutionOutcome) -> None:
        """Record the finished job in history (before anyone is told it finished)."""
        with self._lock:
            self._running = None
            while len(self._history) >= self.max_history:
                del self._history[next(iter(self._history))]
            self._history[job.prompt_id] = {"prompt": job.item(), "outputs": outcome.outputs, "status": outcome.status,
                                            "meta": outcome.meta}
            self.on_change()

    def running(self) -> Job | None:
        with self._lock:
            return self._running

    def remaining(self) -> int:
        """Pending plus running (ComfyUI's queue_remaining)."""
        with self._lock:
            return len(self._heap) + (self._running is not None)

    def snapshot(self) -> dict:
        with self._lock:
            running = [self._running.item()] if self._running else []
            pending = [job.item() for job in sorted(self._heap)]
            return {"queue_running": running, "queue_pending": pending}

    def delete(self, prompt_ids) -> None:
        ids = {str(i) for i in prompt_ids}
        with self._lock:
            self._heap = [job for job in self._heap if job.prompt_id not in ids]
            heapq.heapify(self._heap)
            self.on_change()

    def clear(self) -> None:
        with self._lock:
            self._heap = []
            self.on_change()

    def history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        with self._lock:
            if prompt_id is not None:
                entry = self._history.get(prompt_id)
                return {prompt_id: entry} if entry is not None else {}
            items = list(self._history.items())
            if offset < 0 and max_items is not None:
                offset = len(items) - max_items
            items = items[max(offset, 0):]
            if max_items is not None:
                items = items[:max_items]
            return dict(items)

    def delete_history(self, prompt_ids) -> None:
        with self._lock:
            for prompt_id in prompt_ids:
                self._history.pop(str(prompt_id), None)

    def clear_history(self) -> None:
        with self._lock:
            self._history.clear()
