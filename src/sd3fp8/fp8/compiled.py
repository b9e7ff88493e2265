"""torch.compile of a transformer with FP8 layers (``--compile``).

Compiled, an FP8Linear's activation quantization (amax, divide, clamp, cast: ~15 eager kernels)
becomes one or two fused kernels, the weight decode and the output scale/bias fuse around the GEMM,
and on CUDA the scales land in the GEMM's epilogue. Every layer's form is chosen (the device probed)
before compiling: a graph cannot probe, and it does not fall back at run time either.

Inductor compiles CPU kernels with a C++ compiler against Python's headers, GPU kernels with
Triton: :func:`compile_problem` checks for them up front, so a platform that cannot compile gets
one clear error instead of a traceback from deep inside the first generation step.
"""

from __future__ import annotations

import functools
import sysconfig
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from sd3fp8.errors import ConfigError
from sd3fp8.fp8.linear import FP8Linear


class CompileError(ConfigError):
    pass


def compile_problem(device: torch.device | str) -> str | None:
    """Why torch.compile cannot work for ``device`` here, or None."""
    device = torch.device(device)
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - inductor raises several kinds here
            return f"inductor finds no C++ compiler for CPU kernels ({str(e).splitlines()[0] if str(e) else type(e).__name__}): install g++"
        include = Path(sysconfig.get_paths()["include"]) / "Python.h"
        if not include.is_file():
            return f"inductor needs Python's C headers ({include} is missing): install python3-dev"
        return None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor needs Triton for GPU kernels and it is not installed (pip install triton)"
        return None
    return f"torch.compile is not set up for {device.type} devices here"


def prepare_layers(model: nn.Module, device: torch.device | str, compute_dtype: torch.dtype) -> Counter:
    """Choose every FP8 layer's form for ``device`` (probing it once); returns forms -> layer count."""
    return Counter(layer.prepare(device, compute_dtype).form.value for layer in _fp8_layers(model))


def _fp8_layers(model: nn.Module) -> list[FP8Linear]:
    return [m for m in model.modules() if isinstance(m, FP8Linear)]


def compile_module(model: nn.Module, device: torch.device | str, compute_dtype: torch.dtype) -> nn.Module:
    """Compile ``model.forward`` in place (hooks added later, e.g. CPU offload, wrap the compiled
    forward). Raises :class:`CompileError` when this platform cannot compile."""
    problem = compile_problem(device)
    if problem is not None:
        raise CompileError(f"--compile cannot work here: {problem}")
    prepare_layers(model, device, compute_dtype)
    compiled = torch.compile(model.forward)
    eager = model.forward

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except _compile_failures() as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CompileError(f"torch.compile failed on this platform ({first}); run without --compile") from e

    model.forward = forward
    setattr(model, "_sd3fp8_compiled", True)  # noqa: B010  (nn.Module's typed __setattr__ takes tensors and modules)
    return model


@functools.cache
def _compile_failures() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "could not compile" (not a failure of the model itself)."""
    failures: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import BackendCompilerFailed

        failures.append(BackendCompilerFailed)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import InductorError

        failures.append(InductorError)
    except ImportError:
        pass
    return tuple(failures) or (RuntimeError,)


def is_compiled(model: nn.Module) -> bool:
    return bool(getattr(model, "_sd3fp8_compiled", False))
