"""What a loaded pipeline holds: per component sizes and dtypes, and per layer its FP8 scheme."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from sd3fp8.engine.fastpath import fp8_forms
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.policy import COMPONENT_LABELS, COMPONENTS


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensors(module: nn.Module):
    """Every parameter and buffer once (shared tensors counted once), FP8 buffers included."""
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def component_summary(module: nn.Module) -> dict:
    elements = Counter()
    nbytes = 0
    for t in tensors(module):
        elements[_dtype_name(t.dtype)] += t.numel()
        nbytes += t.numel() * t.element_size()
    return {"parameters": sum(elements.values()), "bytes": nbytes, "dtypes": dict(elements.most_common())}


def layer_rows(module: nn.Module) -> list[dict]:
    """One row per module that owns a weight: its dtype, shape and (for FP8) scheme."""
    rows = []
    for name, m in module.named_modules():
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        row = {"name": name, "type": type(m).__name__, "dtype": _dtype_name(weight.dtype), "shape": list(weight.shape)}
        if isinstance(m, FP8Linear):
            row.update(m.describe())
        rows.append(row)
    return rows


def inspect_pipeline(engine, layers: bool = False) -> dict:
    """Report for an :class:`SD3FP8Pipeline`; ``layers`` adds every weight-owning module."""
    report = {
        "model": str(engine.model_path),
        "device": str(engine.device),
        "compute_dtype": _dtype_name(engine.compute_dtype),
        "policy": engine.policy.to_dict(),
        "sources": engine.sources.describe() if engine.sources else [],
        "components": {},
    }
    for component in COMPONENTS:
        module = engine.component(component)
        if module is None:  # T5 off, or offload=stages (loaded only while it runs)
            report["components"][component] = "staged" if engine.is_staged(component) else None
            continue
        summary = component_summary(module)
        summary["precision"] = engine.policy.precision(component).value
        summary["fp8_layers"] = len([m for m in module.modules() if isinstance(m, FP8Linear)])
        summary["fp8_forms"] = fp8_forms(module)
        if layers:
            summary["layers"] = layer_rows(module)
        report["components"][component] = summary
    return report


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_report(report: dict) -> str:
    lines = [f"model   {report['model']}", f"device  {report['device']} (compute {report['compute_dtype']})"]
    lines += [f"source  {line}" for line in report.get("sources", [])] + [""]
    lines.append(f"{'component':<16}{'':<8}{'precision':<10}{'params':>14}{'bytes':>14}  fp8 layers  dtypes")
    for component, s in report["components"].items():
        label = COMPONENT_LABELS[component]
        if not isinstance(s, dict):
            lines.append(f"{component:<16}{label:<8}{s or 'off'}")
            continue
        dtypes = ", ".join(f"{d} {n / s['parameters']:.0%}" for d, n in s["dtypes"].items())
        lines.append(
            f"{component:<16}{label:<8}{s['precision']:<10}{s['parameters']:>14,}{_mb(s['bytes']):>14}  {s['fp8_layers']:>10}  {dtypes}"
        )
    forms = [f"{c}: " + ", ".join(f"{n} {form}" for form, n in s["fp8_forms"].items())
             for c, s in report["components"].items() if isinstance(s, dict) and s.get("fp8_forms")]
    lines += [""] + [f"fp8 forms  {line}" for line in forms] if forms else []
    for component, s in report["components"].items():
        if not isinstance(s, dict) or "layers" not in s:
            continue
        lines += ["", f"[{component}]"]
        for row in s["layers"]:
            scheme = ""
            if "format" in row:
                scheme = f"{row['granularity']} scale {tuple(row['scale_shape'])}, {row['backend']}"
                if row["backend"] != "weight-only":
                    scheme += f", activation {row['activation']}"
                scheme += f", form {row['form']}"
                if row["fallback"]:
                    scheme += f" (fallback: {row['fallback']})"
            lines.append(f"  {row['name']:<60} {row['type']:<22} {row['dtype']:<14} {tuple(row['shape'])!s:<16} {scheme}")
    return "\n".join(lines)
