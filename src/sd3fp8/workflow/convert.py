"""UI-format workflows (what the frontend saves, what templates are) -> API prompts.

Follows the frontend's graphToPrompt (comfyui-frontend-package 1.35.9): widget values map
positionally onto the widget inputs of the node's /object_info input_order (required, then
optional), skipping the companion slots the frontend adds (`control_after_generate` after a seed,
the upload button after LoadImage's image); connected inputs become ``[origin_id, slot]``; virtual
nodes (notes, reroutes, primitives) vanish, muted nodes are left out and bypassed nodes are passed
through by type. Subgraphs and group nodes are not flattened here.
"""

from __future__ import annotations

from sd3fp8.errors import SD3FP8Error
from sd3fp8.workflow.registry import Registry
from sd3fp8.workflow.spec import combo_options, declared_inputs, input_kind, is_widget

VIRTUAL_NODES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
MODE_NEVER, MODE_BYPASS = 2, 4
_EMPTY = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}


class ConversionError(SD3FP8Error):
    """A UI workflow this converter cannot turn into an API prompt."""


def is_ui_workflow(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _links(workflow: dict) -> dict[int, tuple[int, int, str]]:
    """link id -> (origin node id, origin slot, type), from either serialisation (arrays or objects)."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type", "*"))
        elif isinstance(link, list) and len(link) >= 5:
            out[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else "*")
    return out


class _Graph:
    def __init__(self, workflow: dict, registry: Registry):
        self.registry = registry
        self.nodes = {n["id"]: n for n in workflow["nodes"] if isinstance(n, dict) and "id" in n}
        self.links = _links(workflow)
        subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs", [])}
        for node in self.nodes.values():
            if node.get("type") in subgraphs:
                raise ConversionError(f"node {node['id']} is a subgraph: queue this workflow from the frontend, which flattens it")

    def origin(self, link_id, depth: int = 0) -> tuple[int, int] | None:
        """The real node and slot feeding ``link_id``, through reroutes and bypassed nodes."""
        if link_id is None or link_id not in self.links or depth > len(self.nodes):
            return None
        node_id, slot, kind = self.links[link_id]
        node = self.nodes.get(node_id)
        if node is None:
            return None
        if node.get("type") == "Reroute":
            inputs = node.get("inputs") or []
            return self.origin(inputs[0].get("link"), depth + 1) if inputs else None
        if node.get("type") in VIRTUAL_NODES or node.get("mode") == MODE_NEVER:
            return None  # a primitive's value is already in the target's widgets_values
        if node.get("mode") == MODE_BYPASS:
            inputs = node.get("inputs") or []
            for i in [slot, *range(len(inputs))]:
                if i < len(inputs) and inputs[i].get("type") == kind:
                    return self.origin(inputs[i].get("link"), depth + 1)
            return None
        return node_id, slot

    def widget_values(self, node: dict, types: dict) -> dict:
        values = node.get("widgets_values") or []
        widgets = [(name, spec) for name, (_, spec) in declared_inputs(types).items() if is_widget(spec)]
        out, i = {}, 0
        for name, spec in widgets:
            if isinstance(values, dict):
                value = values.get(name, _default(spec))
            else:
                value = values[i] if i < len(values) else _default(spec)
                _, extra = input_kind(spec)
                i += 1 + bool(extra.get("control_after_generate")) + bool(extra.get("image_upload"))
            out[name] = {"__value__": value} if isinstance(value, list) else value
        return out

    def convert_node(self, node: dict) -> dict:
        class_type = node["type"]
        inputs: dict = {}
        title = node.get("title")
        if class_type in self.registry:
            types = self.registry.input_types(class_type)
            inputs = self.widget_values(node, types)
            title = title or self.registry.node_info(class_type)["display_name"] or class_type
        for slot in node.get("inputs") or []:
            source = self.origin(slot.get("link"))
            if source is not None:
                inputs[slot["name"]] = [str(source[0]), source[1]]
        return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title or class_type}}


def _default(spec: list):
    kind, extra = input_kind(spec)
    if "default" in extra:
        return extra["default"]
    options = combo_options(spec)
    if options is not None:
        return options[0] if options else None
    return _EMPTY.get(kind)


def ui_to_api(workflow: dict, registry: Registry) -> dict:
    """The API prompt the frontend would queue for ``workflow`` (UI format, version 0.4 or 1)."""
    if not is_ui_workflow(workflow):
        raise ConversionError("not a UI workflow: expected an object with 'nodes' and 'links'")
    graph = _Graph(workflow, registry)
    prompt = {}
    for node in sorted(graph.nodes.values(), key=lambda n: (n.get("order", 0), str(n["id"]))):
        if node.get("type") in VIRTUAL_NODES or node.get("mode") in (MODE_NEVER, MODE_BYPASS) or "type" not in node:
            continue
        prompt[str(node["id"])] = graph.convert_node(node)
    for entry in prompt.values():  # links to nodes left out go too (the frontend's last pass)
        for name in [n for n, v in entry["inputs"].items() if isinstance(v, list) and v[0] not in prompt]:
            del entry["inputs"][name]
    return prompt
