"""ComfyUI workflows over the sd3fp8 engine: the SD3.5 node set, validation, UI->API conversion,
and an executor with ComfyUI's caching and events.

Modules: ``types`` (the values on links), ``backend`` (the engine seam), ``spec`` (node
definitions, /object_info rendering), ``nodes_*`` (the node set), ``registry``, ``validation``,
``convert``, ``executor``, ``images`` / ``paths`` / ``preview`` (files and previews).
"""

from sd3fp8.workflow.backend import MODEL_FOLDERS, WEIGHT_DTYPES, Backend, SampleRequest, StepCallback, TextPrompts
from sd3fp8.workflow.convert import ConversionError, is_ui_workflow, ui_to_api
from sd3fp8.workflow.executor import EventSink, ExecutionOutcome, Executor
from sd3fp8.workflow.registry import SD35_NODES, Inventory, Registry, build_registry
from sd3fp8.workflow.spec import Folders, NodeContext, NodeDef, NodeResult, Options, Preview
from sd3fp8.workflow.types import Clip, CondEntry, Conditioning, Interrupted, InterruptFlag, Latent, Model, NodeError, Vae
from sd3fp8.workflow.validation import ValidationResult, prompt_error, validate_prompt

__all__ = [
    "MODEL_FOLDERS", "SD35_NODES", "WEIGHT_DTYPES", "Backend", "Clip", "CondEntry", "Conditioning", "ConversionError",
    "EventSink", "ExecutionOutcome", "Executor", "Folders", "Interrupted", "InterruptFlag", "Inventory", "Latent", "Model",
    "NodeContext", "NodeDef", "NodeError", "NodeResult", "Options", "Preview", "Registry", "SampleRequest", "StepCallback",
    "TextPrompts", "Vae", "ValidationResult", "build_registry", "is_ui_workflow", "prompt_error", "ui_to_api", "validate_prompt",
]
