"""Node definitions: ComfyUI's INPUT_TYPES / RETURN_TYPES as data, rendered as /object_info entries.

A node is a :class:`NodeDef` (plain data plus a function); the SD3.5 set lives in ``nodes_*.py``
and is assembled by ``registry.py``. Combo lists that depend on the installation (model files,
input images, sampler and scheduler names) come from an :class:`Options` provider at render time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sd3fp8.workflow.types import InterruptFlag

if TYPE_CHECKING:
    from PIL import Image

    from sd3fp8.workflow.backend import Backend

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


class Options(Protocol):
    """The installation-dependent combo lists."""

    def model_files(self, folder: str) -> list[str]: ...

    def input_images(self) -> list[str]: ...

    def sampler_names(self) -> list[str]: ...

    def scheduler_names(self) -> list[str]: ...


@dataclass(frozen=True)
class Folders:
    """ComfyUI's input/, output/ and temp/ folders (absolute, resolved)."""

    input: Path
    output: Path
    temp: Path

    @classmethod
    def under(cls, root: Path) -> Folders:
        return cls(input=(root / "input").resolve(), output=(root / "output").resolve(), temp=(root / "temp").resolve())

    def by_type(self, kind: str) -> Path | None:
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind)


@dataclass(frozen=True)
class Preview:
    """An image for a binary WebSocket frame: a sampler preview (JPEG, resized to ``max_size``)
    or a SaveImageWebsocket output (PNG, full size)."""

    image: Image.Image
    format: str = "JPEG"  # "JPEG" | "PNG"
    max_size: int | None = 512


@dataclass
class NodeContext:
    """What a running node may use besides its inputs."""

    backend: Backend
    folders: Folders
    node_id: str
    prompt_id: str
    prompt: dict  # the API prompt (written into saved PNGs)
    extra_pnginfo: dict | None  # extra_data["extra_pnginfo"] (the UI workflow)
    interrupt: InterruptFlag
    previews: bool  # sampler previews wanted (extra_data preview_method != "none")
    on_progress: Callable[[str, float, float, Preview | None], None] = field(repr=False, default=lambda *a: None)

    def progress(self, value: float, total: float, preview: Preview | None = None) -> None:
        """Report progress (a `progress` event) and stop here if the prompt was interrupted."""
        self.interrupt.check()
        self.on_progress(self.node_id, value, total, preview)


@dataclass(frozen=True)
class NodeResult:
    """What a node function returns when it has UI output (SaveImage's images) besides values."""

    outputs: tuple = ()
    ui: dict | None = None


InputTypes = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class NodeDef:
    """One node class. ``inputs(options)`` returns ComfyUI's INPUT_TYPES dict, lists not tuples,
    exactly as /object_info shows it. ``function(ctx, **inputs)`` returns a tuple of outputs or a
    :class:`NodeResult`. ``v3`` renders the entry the way ComfyUI's V3 (comfy_api) nodes are."""

    name: str
    inputs: Callable[[Options], InputTypes]
    function: Callable[..., Any]
    outputs: tuple[str, ...] = ()
    category: str = ""
    display_name: str | None = None
    description: str = ""
    python_module: str = "nodes"
    output_names: tuple[str, ...] | None = None
    output_tooltips: tuple[str | None, ...] | None = None
    output_node: bool = False
    v3: bool = False
    # called with (folders, **literal inputs) before execution; a different value re-runs the node
    is_changed: Callable[..., Any] | None = None
    # called with (folders, **literal inputs): True or an error text (ComfyUI's VALIDATE_INPUTS);
    # the inputs it takes are exempt from the min/max/combo checks
    validate: Callable[..., Any] | None = None
    validate_inputs: tuple[str, ...] = ()

    def render(self, options: Options) -> dict:
        """This node's /object_info entry, in ComfyUI 0.8.0's shape and key order."""
        inputs = self.inputs(options)
        order = {section: list(spec) for section, spec in inputs.items()}
        names = list(self.output_names or self.outputs)
        info: dict[str, Any] = {
            "input": inputs,
            "input_order": order,
            "output": list(self.outputs),
            "output_is_list": [False] * len(self.outputs),
            "output_name": names,
        }
        if self.v3:
            info["output_tooltips"] = list(self.output_tooltips or [None] * len(self.outputs))
            info["output_matchtypes"] = None
        info.update(name=self.name, display_name=self.display_name if self.v3 else (self.display_name or self.name),
                    description=self.description, python_module=self.python_module, category=self.category,
                    output_node=self.output_node)
        if self.v3:
            info.update(deprecated=False, experimental=False, api_node=False)
        elif self.output_tooltips is not None:
            info["output_tooltips"] = list(self.output_tooltips)
        return info


# -- input spec helpers (the shapes /object_info uses) ------------------------------------------


def combo(options: list[str], **extra) -> list:
    """Legacy combo ``[[options], {extra}]`` (``[[options]]`` without extra): what Open WebUI,
    SillyTavern and Krita index with ``[0]``."""
    return [list(options), extra] if extra else [list(options)]


def combo_v3(options: list[str]) -> list:
    """V3 combo ``["COMBO", {"multiselect": false, "options": [...]}]``."""
    return ["COMBO", {"multiselect": False, "options": list(options)}]


def input_kind(spec: list) -> tuple[Any, dict]:
    """(type, extra) of one input spec: type is a str, or the option list of a legacy combo."""
    extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0], extra


def combo_options(spec: list) -> list | None:
    """The options of a combo input (either form), else None."""
    kind, extra = input_kind(spec)
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(extra.get("options", []))
    return None


def is_widget(spec: list) -> bool:
    """True when the frontend draws this input as a widget (a value, not a socket)."""
    kind, extra = input_kind(spec)
    if extra.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def declared_inputs(types: InputTypes) -> dict[str, tuple[str, list]]:
    """name -> (section, spec) over the required and optional inputs, in input order."""
    out: dict[str, tuple[str, list]] = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            out[name] = (section, spec)
    return out
