"""API-prompt validation with ComfyUI's rules and error shape (execution.py validate_prompt, v0.8.0).

Errors are ``{"type", "message", "details", "extra_info"}``; per-node errors are collected in
``node_errors[id] = {"errors", "dependent_outputs", "class_type"}`` so the frontend can highlight
``extra_info.input_name``. A prompt is accepted when at least one output validates.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from sd3fp8.workflow.registry import Registry
from sd3fp8.workflow.spec import InputTypes, NodeDef, combo_options, declared_inputs, input_kind

_CONVERT = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
_LIST_INFO_LIMIT = 20  # ComfyUI leaves long model lists out of value_not_in_list errors


@dataclass
class ValidationResult:
    ok: bool
    error: dict | None = None
    outputs: list[str] = field(default_factory=list)  # output nodes to execute
    node_errors: dict = field(default_factory=dict)
    prompt: dict = field(default_factory=dict)  # the prompt with literal values converted


def prompt_error(kind: str, message: str, details: str = "", extra_info: dict | None = None) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info or {}}


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)


def _error(kind: str, message: str, name: str, details: str | None = None, **extra) -> dict:
    return prompt_error(kind, message, name if details is None else details, {"input_name": name, **extra})


class _Validator:
    def __init__(self, registry: Registry, prompt: dict):
        self.registry = registry
        self.prompt = prompt
        self.types: dict[str, InputTypes] = {}
        self.limits: dict[str, dict] = {}
        self.validated: dict[str, tuple[bool, list]] = {}
        self.active: set[str] = set()

    def input_types(self, class_type: str) -> InputTypes:
        if class_type not in self.types:
            self.types[class_type] = self.registry.input_types(class_type)
        return self.types[class_type]

    def node(self, node_id: str) -> tuple[dict, NodeDef]:
        node = self.prompt[node_id]
        return node, self.registry.get(node["class_type"])

    def validate(self, node_id: str) -> tuple[bool, list]:
        if node_id in self.validated:
            return self.validated[node_id]
        self.active.add(node_id)
        node, node_def = self.node(node_id)
        inputs = node["inputs"]
        errors, valid = [], True
        for name, (section, spec) in declared_inputs(self.input_types(node["class_type"])).items():
            if name not in inputs:
                if section == "required":
                    errors.append(prompt_error("required_input_missing", "Required input is missing", name, {"input_name": name}))
                continue
            kind, extra = input_kind(spec)
            config = [kind, extra]
            if isinstance(inputs[name], list):
                error, upstream_ok = self.check_link(name, inputs[name], kind, config)
                valid &= upstream_ok
            else:
                error = self.check_value(node_def, inputs, name, spec, config)
            if error:
                errors.append(error)
        errors += self.custom_checks(node_def, inputs)
        self.active.discard(node_id)
        result = (valid and not errors, errors)
        self.validated[node_id] = result
        return result

    def check_link(self, name: str, value: list, kind, config) -> tuple[dict | None, bool]:
        if len(value) != 2:
            return _error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", name,
                          input_config=config, received_value=value), True
        source, slot = str(value[0]), value[1]
        if source not in self.prompt:
            return _error("bad_linked_input", "Linked node does not exist", name, f"{name}: node {source} is not in the prompt",
                          input_config=config, received_value=value), True
        _, source_def = self.node(source)
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < len(source_def.outputs):
            return _error("bad_linked_input", "Linked output does not exist", name,
                          f"{name}: {source_def.name} has no output {slot!r}", input_config=config, received_value=value), True
        value[:] = [source, slot]
        received = source_def.outputs[slot]
        if not types_match(received, kind):
            return _error("return_type_mismatch", "Return type mismatch between linked nodes", name,
                          f"{name}, received_type({received}) mismatch input_type({kind if isinstance(kind, str) else 'COMBO'})",
                          input_config=config, received_type=received, linked_node=value), True
        if source in self.active:
            return _error("dependency_cycle", "Dependency cycle detected", name, f"{name}: a link leads back to this node",
                          linked_node=value), False
        ok, _ = self.validate(source)
        return None, ok

    def check_value(self, node_def: NodeDef, inputs: dict, name: str, spec: list, config) -> dict | None:
        kind, extra = input_kind(spec)
        value = inputs[name]
        if isinstance(value, dict) and "__value__" in value:
            value = inputs[name] = value["__value__"]
        if isinstance(kind, str) and kind not in _CONVERT and kind != "COMBO":
            return _error("bad_linked_input", f"Input '{name}' takes a link to a {kind} output, not a value", name,
                          input_config=config, received_value=value)
        try:
            if isinstance(kind, str) and kind in _CONVERT:
                value = inputs[name] = _CONVERT[kind](value)
            if kind == "FLOAT" and not math.isfinite(value):
                raise ValueError("not a finite number")
        except (TypeError, ValueError, OverflowError) as ex:
            return _error("invalid_input_type", f"Failed to convert an input value to a {kind} value", name,
                          f"{name}, {value}, {ex}", input_config=config, received_value=value, exception_message=str(ex))
        if name in node_def.validate_inputs:
            return None
        if "min" in extra and value < extra["min"]:
            return _error("value_smaller_than_min", f"Value {value} smaller than min of {extra['min']}", name,
                          input_config=config, received_value=value)
        if "max" in extra and value > extra["max"]:
            return _error("value_bigger_than_max", f"Value {value} bigger than max of {extra['max']}", name,
                          input_config=config, received_value=value)
        limit = self.limit_error(node_def, name, value, config)
        if limit:
            return limit
        options = combo_options(spec)
        if options is not None and value not in options:
            short = len(options) <= _LIST_INFO_LIMIT
            listing = str(options) if short else f"(list of length {len(options)})"
            return _error("value_not_in_list", "Value not in list", name, f"{name}: '{value}' not in {listing}",
                          input_config=config if short else None, received_value=value)
        return None

    def limit_error(self, node_def: NodeDef, name: str, value, config) -> dict | None:
        """The backend's limits (the engine's size, steps and batch ranges), in ComfyUI's error shapes."""
        limits = self.input_limits(node_def.name).get(name)
        if not limits or not isinstance(value, (int, float)):
            return None
        if "min" in limits and value < limits["min"]:
            return _error("value_smaller_than_min", f"Value {value} smaller than min of {limits['min']} (this server's limit)", name,
                          input_config=config, received_value=value)
        if "max" in limits and value > limits["max"]:
            return _error("value_bigger_than_max", f"Value {value} bigger than max of {limits['max']} (this server's limit)", name,
                          input_config=config, received_value=value)
        step = limits.get("multiple_of")
        if step and value % step:
            return _error("custom_validation_failed", "Custom validation failed for node", name,
                          f"{name} - {value} is not a multiple of {step} (this server's limit)", input_config=config, received_value=value)
        return None

    def input_limits(self, class_type: str) -> dict:
        if class_type not in self.limits:
            self.limits[class_type] = self.registry.input_limits(class_type)
        return self.limits[class_type]

    def custom_checks(self, node_def: NodeDef, inputs: dict) -> list[dict]:
        names = [n for n in node_def.validate_inputs if n in inputs and not isinstance(inputs[n], list)]
        if node_def.validate is None or not names:
            return []
        result = node_def.validate(self.registry.folders, **{n: inputs[n] for n in names})
        if result is True:
            return []
        reason = "" if result is False else f" - {result}"
        return [prompt_error("custom_validation_failed", "Custom validation failed for node", f"{n}{reason}", {"input_name": n})
                for n in names]


def types_match(received: str, expected) -> bool:
    """ComfyUI's validate_node_input: equal, a wildcard, or overlapping comma-separated unions."""
    if not isinstance(expected, str):
        return received == "COMBO"
    if received == expected or "*" in (received, expected):
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


def _check_structure(registry: Registry, prompt) -> dict | None:
    if not isinstance(prompt, dict):
        return prompt_error("invalid_prompt", "Cannot execute because the prompt is not a JSON object of nodes.")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return prompt_error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                                f"Node ID '#{node_id}'")
        if node["class_type"] not in registry:
            return prompt_error("invalid_prompt", f"Cannot execute because node {node['class_type']} does not exist.",
                                f"Node ID '#{node_id}'")
        if not isinstance(node.get("inputs", {}), dict):
            return prompt_error("invalid_prompt", "Cannot execute because a node's inputs are not an object.", f"Node ID '#{node_id}'")
    return None


def validate_prompt(registry: Registry, prompt, partial_targets: list | None = None) -> ValidationResult:
    """Validate an API prompt; the result's ``prompt`` is a converted copy (the input is untouched)."""
    error = _check_structure(registry, prompt)
    if error:
        return ValidationResult(False, error)
    prompt = {str(k): {**copy.deepcopy(v), "inputs": copy.deepcopy(v.get("inputs", {}))} for k, v in prompt.items()}
    targets = None if partial_targets is None else {str(t) for t in partial_targets}
    outputs = [k for k, v in prompt.items() if registry.get(v["class_type"]).output_node and (targets is None or k in targets)]
    if not outputs:
        return ValidationResult(False, prompt_error("prompt_no_outputs", "Prompt has no outputs"), prompt=prompt)
    validator = _Validator(registry, prompt)
    good, node_errors = [], {}
    for output in outputs:
        ok, _ = validator.validate(output)
        if ok:
            good.append(output)
            continue
        for node_id, (node_ok, reasons) in validator.validated.items():
            if node_ok or not reasons:
                continue  # downstream of a failing node: invalid but not its fault
            entry = node_errors.setdefault(node_id, {"errors": reasons, "dependent_outputs": [],
                                                     "class_type": prompt[node_id]["class_type"]})
            entry["dependent_outputs"].append(output)
    if not good:
        error = prompt_error("prompt_outputs_failed_validation", "Prompt outputs failed validation")
        return ValidationResult(False, error, [], node_errors, prompt)
    return ValidationResult(True, None, good, node_errors, prompt)
