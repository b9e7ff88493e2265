"""Run a validated API prompt: nodes in dependency order, outputs of unchanged nodes cached between
prompts, progress reported through an event sink, interruption between nodes and within steps.

Events follow ComfyUI v0.8.0 (execution.py, comfy_execution/progress.py): execution_start,
execution_cached, then per node progress_state (running), executing, progress..., executed (nodes
with UI output), progress_state (finished); a cached output node gets `executed` without
`executing`; then execution_success, or execution_error / execution_interrupted. Caching is
ComfyUI's classic cache: a node's key is its class, its literal inputs, its IS_CHANGED value and the
keys of the nodes feeding it, so equal keys mean equal outputs; keys absent from the new prompt
are dropped before it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sd3fp8.workflow.backend import Backend
from sd3fp8.workflow.registry import Registry
from sd3fp8.workflow.spec import NodeContext, NodeResult, Preview, declared_inputs
from sd3fp8.workflow.types import Interrupted, InterruptFlag, NodeError

log = logging.getLogger(__name__)
_MESSAGE_LIMIT = 2000  # characters of an exception message sent to clients


class EventSink(Protocol):
    """Where execution events go. ``broadcast`` events are sent even when the prompt has no
    client (ComfyUI's execution_interrupted, progress, progress_state)."""

    def send(self, event: str, data: dict, broadcast: bool = False) -> None: ...

    def preview(self, node_id: str, preview: Preview) -> None: ...


@dataclass
class ExecutionOutcome:
    """The history entry's `status`, `outputs` and `meta` for one prompt."""

    success: bool
    interrupted: bool
    messages: list = field(default_factory=list)  # [[event, data], ...]
    outputs: dict = field(default_factory=dict)  # node_id -> UI output ({"images": [...]})
    meta: dict = field(default_factory=dict)

    @property
    def status(self) -> dict:
        return {"status_str": "success" if self.success else "error", "completed": self.success, "messages": self.messages}


def _now_ms() -> int:
    return int(time.time() * 1000)


def format_value(value):
    """A node input as execution_error's current_inputs shows it: primitives as they are, tensors
    as their shape, anything else by type (never a multi-megabyte repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


class _Progress:
    """ComfyUI's progress registry for one prompt: node states sent as `progress_state`."""

    def __init__(self, prompt_id: str, sink: EventSink):
        self.prompt_id, self.sink, self.nodes = prompt_id, sink, {}

    def _send(self) -> None:
        nodes = {nid: {**state, "node_id": nid, "prompt_id": self.prompt_id, "display_node_id": nid, "parent_node_id": None,
                       "real_node_id": nid} for nid, state in self.nodes.items()}
        self.sink.send("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, broadcast=True)

    def start(self, node_id: str) -> None:
        self.nodes[node_id] = {"value": 0.0, "max": 1.0, "state": "running"}
        self._send()

    def update(self, node_id: str, value: float, total: float) -> None:
        self.nodes[node_id] = {"value": value, "max": total, "state": "running"}
        self._send()

    def finish(self, node_id: str, state: str = "finished") -> None:
        entry = self.nodes.setdefault(node_id, {"value": 0.0, "max": 1.0, "state": state})
        entry.update(state=state, value=entry["max"])
        self._send()


class Executor:
    """Executes prompts one at a time (call from one thread); keeps the output cache between them."""

    def __init__(self, registry: Registry, backend: Backend, previews: bool = True):
        self.registry = registry
        self.backend = backend
        self.previews = previews  # server default when a prompt does not choose a preview_method
        self.outputs: dict[str, tuple] = {}  # cache key -> node outputs
        self.ui: dict[str, dict] = {}  # cache key -> {"meta", "output"}

    def clear_cache(self) -> None:
        self.outputs.clear()
        self.ui.clear()

    # -- cache keys ------------------------------------------------------------------------------

    def cache_keys(self, prompt: dict) -> dict[str, str]:
        keys: dict[str, str] = {}

        def key(node_id: str) -> str:
            if node_id not in keys:
                keys[node_id] = ""  # a cycle (not reachable after validation) hashes as empty
                keys[node_id] = self._key(prompt, node_id, key)
            return keys[node_id]

        for node_id in prompt:
            key(node_id)
        return keys

    def _key(self, prompt: dict, node_id: str, key: Callable[[str], str]) -> str:
        node = prompt[node_id]
        node_def = self.registry.get(node["class_type"])
        declared = declared_inputs(self.registry.input_types(node["class_type"]))
        parts = []
        for name in sorted(n for n in node["inputs"] if n in declared):
            value = node["inputs"][name]
            parts.append([name, ["link", key(str(value[0])), value[1]] if isinstance(value, list) else value])
        changed = None
        if node_def.is_changed is not None:
            literals = {k: v for k, v in node["inputs"].items() if k in declared and not isinstance(v, list)}
            try:
                changed = node_def.is_changed(self.registry.folders, **literals)
            except Exception:  # noqa: BLE001 - ComfyUI's rule: an IS_CHANGED that fails means "changed"
                changed = secrets.token_hex(8)
        blob = json.dumps([node["class_type"], changed, parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    # -- execution -------------------------------------------------------------------------------

    def order(self, prompt: dict, outputs: list[str], keys: dict[str, str]) -> list[str]:
        """Nodes to visit, dependencies first: each output and the uncached nodes it needs."""
        order, seen = [], set()

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            node = prompt[node_id]
            for name in declared_inputs(self.registry.input_types(node["class_type"])):
                value = node["inputs"].get(name)
                if isinstance(value, list) and keys[str(value[0])] not in self.outputs:
                    visit(str(value[0]))
            order.append(node_id)

        for output in outputs:
            visit(output)
        return order

    def execute(self, prompt_id: str, prompt: dict, outputs: list[str], extra_data: dict, sink: EventSink,
                interrupt: InterruptFlag) -> ExecutionOutcome:
        """Run a prompt validated by :func:`validate_prompt` (its converted copy) for ``outputs``."""
        outcome = ExecutionOutcome(success=False, interrupted=False)

        def message(event: str, data: dict, broadcast: bool = False) -> None:
            data = {**data, "timestamp": _now_ms()}
            outcome.messages.append([event, data])
            sink.send(event, data, broadcast)

        message("execution_start", {"prompt_id": prompt_id})
        keys = self.cache_keys(prompt)
        live = set(keys.values())
        for cache in (self.outputs, self.ui):
            for stale in [k for k in cache if k not in live]:
                del cache[stale]
        message("execution_cached", {"nodes": [n for n in prompt if keys[n] in self.outputs], "prompt_id": prompt_id})
        run = _Run(self, prompt_id, prompt, keys, extra_data, sink, interrupt)
        failure = None
        for node_id in self.order(prompt, outputs, keys):
            failure = run.node(node_id)
            if failure is not None:
                break
        if failure is None:
            outcome.success = True
            message("execution_success", {"prompt_id": prompt_id})
        else:
            outcome.interrupted = isinstance(failure[1], Interrupted)
            message(*run.failure_event(*failure), broadcast=outcome.interrupted)
        for node_id in prompt:
            entry = self.ui.get(keys[node_id])
            if entry is not None:
                outcome.outputs[node_id] = entry["output"]
                outcome.meta[node_id] = entry["meta"]
        return outcome


class _Run:
    """One prompt's execution state."""

    def __init__(self, executor: Executor, prompt_id, prompt, keys, extra_data, sink, interrupt):
        self.ex, self.prompt_id, self.prompt, self.keys = executor, prompt_id, prompt, keys
        self.extra_data, self.sink, self.interrupt = extra_data, sink, interrupt
        self.progress = _Progress(prompt_id, sink)
        self.executed: list[str] = []
        self.current_inputs: dict = {}
        method = extra_data.get("preview_method")
        self.previews = executor.previews if method in (None, "", "default") else method != "none"

    def _meta(self, node_id: str) -> dict:
        return {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}

    def node(self, node_id: str) -> tuple[str, Exception] | None:
        """Run (or replay from cache) one node; returns (node_id, exception) on failure."""
        key = self.keys[node_id]
        if key in self.ex.outputs:  # a cached output node: replay its UI
            cached = self.ex.ui.get(key)
            self.sink.send("executed", {"node": node_id, "display_node": node_id, "output": cached["output"] if cached else None,
                                        "prompt_id": self.prompt_id})
            self.progress.finish(node_id)
            return None
        node = self.prompt[node_id]
        node_def = self.ex.registry.get(node["class_type"])
        self.progress.start(node_id)
        self.sink.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
        try:
            inputs = self._inputs(node)
            self.current_inputs = inputs
            self.interrupt.check()
            result = node_def.function(self._context(node_id), **inputs)
            outputs, ui = (result.outputs, result.ui) if isinstance(result, NodeResult) else (tuple(result), None)
            if len(outputs) != len(node_def.outputs):
                raise NodeError(f"{node_def.name} returned {len(outputs)} outputs, expected {len(node_def.outputs)}")
        except Exception as e:  # noqa: BLE001 - every failure is reported as execution_error
            if not isinstance(e, (Interrupted, NodeError)):
                log.exception("node %s (%s) failed", node_id, node["class_type"])
            self.progress.finish(node_id, "error")
            return node_id, e
        if ui:
            self.ex.ui[key] = {"meta": self._meta(node_id), "output": ui}
            self.sink.send("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": self.prompt_id})
        self.ex.outputs[key] = tuple(outputs)
        self.progress.finish(node_id)
        self.executed.append(node_id)
        return None

    def _inputs(self, node: dict) -> dict:
        inputs = {}
        for name in declared_inputs(self.ex.registry.input_types(node["class_type"])):
            if name not in node["inputs"]:
                continue
            value = node["inputs"][name]
            if isinstance(value, list):
                value = self.ex.outputs[self.keys[str(value[0])]][value[1]]
            inputs[name] = value
        return inputs

    def _context(self, node_id: str) -> NodeContext:
        def on_progress(nid: str, value: float, total: float, preview: Preview | None) -> None:
            self.progress.update(nid, value, total)
            self.sink.send("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": nid}, broadcast=True)
            if preview is not None:
                self.sink.preview(nid, preview)

        return NodeContext(backend=self.ex.backend, folders=self.ex.registry.folders, node_id=node_id, prompt_id=self.prompt_id,
                           prompt=self.prompt, extra_pnginfo=self.extra_data.get("extra_pnginfo"), interrupt=self.interrupt,
                           previews=self.previews, on_progress=on_progress)

    def failure_event(self, node_id: str, error: Exception) -> tuple[str, dict]:
        base = {"prompt_id": self.prompt_id, "node_id": node_id, "node_type": self.prompt[node_id]["class_type"],
                "executed": list(self.executed)}
        if isinstance(error, Interrupted):
            return "execution_interrupted", base
        text = str(error) or type(error).__name__
        return "execution_error", {
            **base,
            "exception_message": text[:_MESSAGE_LIMIT],
            "exception_type": f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins."),
            "traceback": [],  # kept in the server log, never sent to clients
            "current_inputs": {k: [format_value(v)] for k, v in self.current_inputs.items()},
            "current_outputs": [n for n in self.prompt if self.keys[n] in self.ex.outputs],
        }
