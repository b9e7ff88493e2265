"""The worker: one thread that owns the executor (and through it the engine), runs queued
prompts one at a time and reports through the hub."""

from __future__ import annotations

import logging
import threading

from sd3fp8.server.hub import Hub
from sd3fp8.server.jobs import Job, PromptQueue
from sd3fp8.workflow.backend import Backend
from sd3fp8.workflow.executor import ExecutionOutcome, Executor
from sd3fp8.workflow.spec import Preview
from sd3fp8.workflow.types import InterruptFlag

log = logging.getLogger(__name__)


class _Sink:
    """Routes one prompt's events the way ComfyUI does: to the prompt's client; when it has none,
    only the broadcast kinds, to everyone."""

    def __init__(self, worker: Worker, job: Job):
        self.worker, self.job, self.sid = worker, job, job.client_id

    def send(self, event: str, data: dict, broadcast: bool = False) -> None:
        if event == "executing":
            self.worker.last_node = data.get("node")
        if self.sid is not None or broadcast:
            self.worker.hub.post(event, data, self.sid)

    def preview(self, node_id: str, preview: Preview) -> None:
        self.worker.hub.post_preview(preview, node_id, self.job.prompt_id, self.sid)


class Worker:
    def __init__(self, queue: PromptQueue, executor: Executor, backend: Backend, hub: Hub):
        self.queue, self.executor, self.backend, self.hub = queue, executor, backend, hub
        self.last_node: str | None = None  # for a client reconnecting mid-run
        self._flag: InterruptFlag | None = None
        self._job: Job | None = None
        self._stop = threading.Event()
        self._free: tuple[bool, bool] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="sd3fp8-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job and end the thread (Ctrl-C, shutdown)."""
        self._stop.set()
        self.interrupt()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the worker did not stop within %.0f s", timeout)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running job (only if it is ``prompt_id``, when given)."""
        with self._lock:
            if self._job is None or self._flag is None:
                return False
            if prompt_id is not None and self._job.prompt_id != prompt_id:
                return False
            self._flag.set()
            return True

    def current_client(self) -> str | None:
        with self._lock:
            return self._job.client_id if self._job else None

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        """POST /free: done by the worker between jobs, like ComfyUI's flags."""
        with self._lock:
            old = self._free or (False, False)
            self._free = (old[0] or unload_models, old[1] or free_memory)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_free()
            job = self.queue.get(timeout=0.2)
            if job is None:
                continue
            if self._stop.is_set():
                self.queue.task_done(job, self._failed(job, interrupted=True))
                break
            self._run(job)

    def _apply_free(self) -> None:
        with self._lock:
            request, self._free = self._free, None
        if request is None:
            return
        try:
            if request[0]:
                self.executor.clear_cache()
            self.backend.free(*request)
        except Exception:  # noqa: BLE001 - a failing free must not end the worker
            log.exception("POST /free failed")

    def _run(self, job: Job) -> None:
        with self._lock:
            self._job, self._flag = job, InterruptFlag()
        try:
            outcome = self.executor.execute(job.prompt_id, job.prompt, job.outputs, job.extra_data, _Sink(self, job), self._flag)
        except Exception:  # noqa: BLE001 - the executor reports node failures itself; this is a bug, logged
            log.exception("prompt %s failed outside any node", job.prompt_id)
            outcome = self._failed(job)
        with self._lock:
            self._job = self._flag = None
        self.last_node = None
        self.queue.task_done(job, outcome)  # history first: clients fetch it on the message below
        if job.client_id is not None:
            self.hub.post("executing", {"node": None, "prompt_id": job.prompt_id}, job.client_id)

    @staticmethod
    def _failed(job: Job, interrupted: bool = False) -> ExecutionOutcome:
        return ExecutionOutcome(success=False, interrupted=interrupted, messages=[])
