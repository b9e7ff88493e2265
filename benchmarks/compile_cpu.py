"""--compile vs eager on this CPU, and aten ops per FP8Linear forward (results: docs/gpu.md).

1. Step time of an SD3.5-Medium-width transformer (2 blocks, 24 heads, 1024 image + 333 text
   tokens, random weights), FP8 weight-only and emulated W8A8, eager vs torch.compile (inductor),
   medians of interleaved calls; SQNR compiled vs eager and both vs the float32 model.
2. Ops per FP8Linear forward (256 -> 256, M = 64: counts do not depend on the size) for every form: the aten ops eager dispatches
   vs the kernels the compiled graph runs (inductor's fused C++ kernels + extern calls), from
   torch.profiler.

    .venv/bin/python benchmarks/compile_cpu.py --dtype bf16 --repeats 5 --out docs/benchmarks/compile_cpu_bf16.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from sd3fp8.evalkit.bench import environment
from sd3fp8.evalkit.synthetic import build_synthetic
from sd3fp8.fp8.compiled import compile_module, prepare_layers
from sd3fp8.fp8.fused import fuse_qkv
from sd3fp8.fp8.linear import Backend, FP8Linear
from sd3fp8.fp8.numerics import sqnr
from sd3fp8.policy import Policy

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def inputs(dtype, height=512):
    g = torch.Generator().manual_seed(1)
    latent = height // 8
    return dict(hidden_states=torch.randn(1, 16, latent, latent, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, 333, 4096, generator=g).to(dtype),
                pooled_projections=torch.randn(1, 2048, generator=g).to(dtype), timestep=torch.tensor([500.0]))


def timed(model, x) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model(**x).sample
    return time.perf_counter() - start, out


def step_times(backend: Backend, dtype, blocks: int, repeats: int, reference: torch.Tensor) -> dict:
    keep = Policy().layer_filter("transformer")
    eager = build_synthetic("medium", blocks, 512, dtype, lambda n, lin: FP8Linear.from_linear(lin, backend=backend.value, name=n), keep)
    if backend is not Backend.WEIGHT_ONLY:
        fuse_qkv(eager)  # what the engine does for layers that quantize activations
    prepare_layers(eager, "cpu", dtype)
    compiled = compile_module(copy.deepcopy(eager), "cpu", dtype)
    x = inputs(dtype)
    with torch.inference_mode():
        _, eager_out = timed(eager, x)
        compile_seconds, compiled_out = timed(compiled, x)
        timed(compiled, x)
        pairs = [(timed(eager, x)[0], timed(compiled, x)[0]) for _ in range(repeats)]  # interleaved
    e, c = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    return {"backend": backend.value, "eager_s": e, "compiled_s": c, "compiled_vs_eager": c / e, "first_compiled_call_s": compile_seconds,
            "eager_times": [p[0] for p in pairs], "compiled_times": [p[1] for p in pairs],
            "sqnr_compiled_vs_eager_db": sqnr(eager_out.float(), compiled_out.float()),
            "sqnr_eager_vs_fp32_db": sqnr(reference, eager_out.float()), "sqnr_compiled_vs_fp32_db": sqnr(reference, compiled_out.float())}


def count_ops(layer: nn.Module, x: torch.Tensor, compiled: bool) -> dict:
    run = torch.compile(layer) if compiled else layer
    with torch.inference_mode():
        run(x), run(x)  # warm-up: compile, decode tables
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(x)
    events = prof.events()
    if not compiled:
        top = [e.name for e in events if e.cpu_parent is None and e.name.startswith("aten::")]
        return {"top_level_aten_ops": len(top), "all_aten_ops": sum(e.name.startswith("aten::") for e in events)}
    region = [e for e in events if e.name.startswith("## Call CompiledFxGraph")]
    kernels = [e.name for e in events if "cpp_fused" in e.name or "triton_" in e.name]
    externs = [e.name for e in events if e.name.startswith("aten::") and e.cpu_parent in region]
    return {"fused_kernels": len(kernels), "extern_aten_calls": externs, "kernels_total": len(kernels) + len(externs)}


def ops_per_layer(dtype) -> list[dict]:
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # inductor's C++ kernels show up in the profiler
    rows = []
    for label, kwargs in (("weight-only", dict(backend="weight-only")), ("emulated", dict(backend="emulated")),
                          ("rowwise (CPU _scaled_mm)", dict(backend="scaled-mm", force_fp8=True)),
                          ("tensorwise (CPU _scaled_mm)", dict(backend="scaled-mm", force_fp8=True, granularity="tensor"))):
        torch.manual_seed(0)
        # op counts do not depend on the size: small, because the CPU _scaled_mm is oneDNN's
        # reference kernel (an fp8 -> float conversion per multiply: minutes at 1024 x 1536 x 1536)
        layer = FP8Linear.from_linear(nn.Linear(256, 256), **kwargs).to(dtype)
        x = torch.randn(64, 256, dtype=dtype)
        layer.prepare("cpu", dtype)
        rows.append({"form": label, "plan": layer.plan.form.value, "eager": count_ops(layer, x, False),
                     "compiled": count_ops(copy.deepcopy(layer), x, True)})
        torch._dynamo.reset()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-steps", action="store_true", help="only count ops")
    p.add_argument("--skip-ops", action="store_true", help="only time steps")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/compile_cpu.json"))
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    report = {"command": " ".join(["benchmarks/compile_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "environment": environment(), "dtype": args.dtype, "blocks": args.blocks}
    if not args.skip_ops:
        report["ops_per_fp8_linear"] = ops_per_layer(dtype)
        print(json.dumps(report["ops_per_fp8_linear"], indent=1), flush=True)
    if not args.skip_steps:
        with torch.inference_mode():
            reference = build_synthetic("medium", args.blocks, 512, torch.float32)(**inputs(torch.float32)).sample.float()
        report["steps"] = []
        for backend in (Backend.WEIGHT_ONLY, Backend.EMULATED):
            report["steps"].append(step_times(backend, dtype, args.blocks, args.repeats, reference))
            print(json.dumps(report["steps"][-1]), flush=True)
            torch._dynamo.reset()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
