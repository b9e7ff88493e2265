"""The node registry: a plain dict of node classes by name, and the /object_info it renders."""

from __future__ import annotations

from collections.abc import Iterable

from sd3fp8.workflow import nodes_conditioning, nodes_image, nodes_latent, nodes_loaders
from sd3fp8.workflow.backend import Backend
from sd3fp8.workflow.images import list_images
from sd3fp8.workflow.spec import Folders, InputTypes, NodeDef, Options

# The SD3.5 node set (issue 14), in ComfyUI's /object_info order where it has one.
SD35_NODES: tuple[NodeDef, ...] = nodes_loaders.NODES + nodes_conditioning.NODES + nodes_latent.NODES + nodes_image.NODES


class Inventory:
    """Options from the backend (model files, sampler and scheduler names) and the input folder."""

    def __init__(self, backend: Backend, folders: Folders):
        self.backend = backend
        self.folders = folders

    def model_files(self, folder: str) -> list[str]:
        return list(self.backend.model_files(folder))

    def input_images(self) -> list[str]:
        return list_images(self.folders.input)

    def sampler_names(self) -> list[str]:
        return list(self.backend.sampler_names())

    def scheduler_names(self) -> list[str]:
        return list(self.backend.scheduler_names())

    def input_limits(self, class_type: str) -> dict:
        """The backend's own limits on a node's inputs (optional: Backend.input_limits)."""
        limits = getattr(self.backend, "input_limits", None)
        return limits(class_type) if limits is not None else {}

    def preferred_size(self, ckpt_name: str) -> tuple[int, int] | None:
        """The size a checkpoint generates at, when it cannot take a template's (optional: Backend.preferred_size)."""
        preferred = getattr(self.backend, "preferred_size", None)
        return preferred(ckpt_name) if preferred is not None else None


class Registry:
    """Node classes by name plus the options their combo lists come from."""

    def __init__(self, options: Options, folders: Folders, nodes: Iterable[NodeDef] = SD35_NODES):
        self.options = options
        self.folders = folders
        self.nodes: dict[str, NodeDef] = {}
        for node in nodes:
            if node.name in self.nodes:
                raise ValueError(f"node {node.name} registered twice")
            self.nodes[node.name] = node

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    def get(self, name: str) -> NodeDef | None:
        return self.nodes.get(name)

    def input_types(self, name: str) -> InputTypes:
        return self.nodes[name].inputs(self.options)

    def input_limits(self, name: str) -> dict:
        """input name -> {"min", "max", "multiple_of"}: the backend's limits beyond the node's own ranges."""
        limits = getattr(self.options, "input_limits", None)
        return limits(name) if limits is not None else {}

    def node_info(self, name: str) -> dict:
        return self.nodes[name].render(self.options)

    def object_info(self) -> dict[str, dict]:
        return {name: node.render(self.options) for name, node in self.nodes.items()}


def build_registry(backend: Backend, folders: Folders, extra_nodes: Iterable[NodeDef] = ()) -> Registry:
    """The SD3.5 registry over ``backend``'s files and names and ``folders``' input images."""
    return Registry(Inventory(backend, folders), folders, SD35_NODES + tuple(extra_nodes))
