"""Engine-core benchmark: FP8 weight-only vs 16/32-bit, per linear and per transformer forward,
and transformer bytes at SD3.5 Medium and Large sizes. Run by hand; not a test.

    .venv/bin/python benchmarks/engine_core.py --out docs/benchmarks/engine_core [--quick]

Timings are medians over --repeats after one warm-up; FP8 and baseline calls alternate in one
process, so the ratios compare like with like on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sd3fp8 import Policy
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.fp8.swap import quantize_linears

MEDIUM = dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
              pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
LARGE = dict(num_layers=38, attention_head_dim=64, num_attention_heads=38, caption_projection_dim=2432,
             pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm")
COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=4096, pooled_projection_dim=2048)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def paired_median_ms(baseline, candidate, repeats: int) -> tuple[float, float]:
    """Median ms of two functions, run alternately (warm-up first) so that load from the rest of
    the machine falls on both alike."""
    baseline(), candidate()
    times = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((baseline, times[0]), (candidate, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def linear_shapes(quick: bool) -> list[tuple[str, int, int]]:
    """(name, K, N) of the SD3.5 Medium (1536) and Large (2432) linears: attention, MLP, adaLN."""
    shapes = []
    for width, label in ((1536, "M"), (2432, "L")):
        shapes += [(f"{label} attn {width}x{width}", width, width), (f"{label} mlp up {width}x{4 * width}", width, 4 * width),
                   (f"{label} mlp down {4 * width}x{width}", 4 * width, width), (f"{label} adaLN {width}x{6 * width}", width, 6 * width)]
    return shapes[:2] if quick else shapes


def bench_linears(dtype_name: str, tokens: list[int], repeats: int, quick: bool) -> list[dict]:
    dtype = DTYPES[dtype_name]
    rows = []
    for name, k, n in linear_shapes(quick):
        torch.manual_seed(0)
        linear = torch.nn.Linear(k, n, dtype=dtype)
        fp8 = FP8Linear.from_linear(linear, backend="weight-only")
        for m in tokens:
            x = torch.randn(m, k, dtype=dtype)
            with torch.inference_mode():
                base, quant = paired_median_ms(lambda: F.linear(x, linear.weight, linear.bias), lambda: fp8(x), repeats)
            rows.append({"layer": name, "K": k, "N": n, "M": m, "dtype": dtype_name, "baseline_ms": base, "fp8_ms": quant, "ratio": quant / base})
            print(f"  linear {name:<24} M={m:<5} {dtype_name}: {base:9.1f} ms  fp8 {quant:9.1f} ms  x{quant / base:.3f}", flush=True)
    return rows


def build_transformer(config: dict, blocks: int | None, dtype: torch.dtype, device: str = "cpu"):
    from diffusers import SD3Transformer2DModel

    cfg = {**COMMON, **config}
    if blocks is not None:
        cfg["num_layers"] = blocks
        cfg["dual_attention_layers"] = tuple(i for i in cfg["dual_attention_layers"] if i < blocks)
    with torch.device(device):
        return SD3Transformer2DModel(**cfg).to(dtype).eval()


def bench_forward(dtype_name: str, tokens: list[int], repeats: int, blocks: int) -> list[dict]:
    """One transformer forward (batch 1, 333 text tokens) at SD3.5-Medium width with a few blocks."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    base = build_transformer(MEDIUM, blocks, dtype)
    fp8 = build_transformer(MEDIUM, blocks, dtype)
    fp8.load_state_dict(base.state_dict())
    quantize_linears(fp8, Policy().layer_filter("transformer"), backend="weight-only")
    rows = []
    for n_tokens in tokens:
        side = int(n_tokens**0.5) * 2  # latent pixels per side; patch 2
        inputs = dict(
            hidden_states=torch.randn(1, 16, side, side, dtype=dtype),
            encoder_hidden_states=torch.randn(1, 333, 4096, dtype=dtype),
            pooled_projections=torch.randn(1, 2048, dtype=dtype),
            timestep=torch.tensor([500.0]),
        )
        with torch.inference_mode():
            b, q = paired_median_ms(lambda: base(**inputs), lambda: fp8(**inputs), repeats)
        rows.append({"blocks": blocks, "image_tokens": n_tokens, "dtype": dtype_name, "baseline_ms": b, "fp8_ms": q, "ratio": q / b})
        print(f"  forward {blocks} blocks, {n_tokens} image tokens, {dtype_name}: {b:9.1f} ms  fp8 {q:9.1f} ms  x{q / b:.3f}", flush=True)
    return rows


def transformer_bytes() -> list[dict]:
    """Bytes of the full-depth transformers, counted on the meta device (no memory used)."""
    rows = []
    for name, config in (("SD3.5 Medium", MEDIUM), ("SD3.5 Large", LARGE)):
        model = build_transformer(config, None, torch.bfloat16, device="meta")
        keep = Policy().layer_filter("transformer")
        params_bf16 = sum(p.numel() * 2 for p in model.parameters())
        buffer_bf16 = model.pos_embed.pos_embed.numel() * 2
        fp8_linear = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and keep(n)}
        w = sum(m.weight.numel() for m in fp8_linear.values())
        rows_scales = sum(m.out_features for m in fp8_linear.values())
        params_fp8 = params_bf16 - 2 * w + w + 4 * rows_scales  # 1 byte a weight + f32 per-channel scales
        adaln = sum(m.weight.numel() for n, m in fp8_linear.items() if "norm1" in n)
        rows.append({
            "model": name, "bf16_bytes": params_bf16, "fp8_bytes": params_fp8, "ratio": params_fp8 / params_bf16,
            "pos_embed_buffer_bytes_bf16": buffer_bf16,
            "ratio_with_pos_embed": (params_fp8 + buffer_bf16) / (params_bf16 + buffer_bf16),
            "fp8_weights": w, "adaln_fp8_weights": adaln,
        })
        print(f"  bytes {name}: bf16 {params_bf16 / 1e9:.2f} GB, fp8 {params_fp8 / 1e9:.2f} GB, x{params_fp8 / params_bf16:.3f}", flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = ["# Engine core benchmark", "", f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']}; torch {results['torch']}; {results['threads']} threads. Medians of {results['repeats']} runs after a warm-up.", ""]
    lines += ["## Transformer bytes (full depth, default policy)", "", "| model | BF16 | FP8 | FP8/BF16 | with the 16-bit pos_embed buffer |", "|---|---|---|---|---|"]
    for r in results["bytes"]:
        lines.append(f"| {r['model']} | {r['bf16_bytes'] / 1e9:.2f} GB | {r['fp8_bytes'] / 1e9:.2f} GB | {r['ratio']:.3f} | {r['ratio_with_pos_embed']:.3f} |")
    lines += ["", "## One transformer forward, SD3.5-Medium width (batch 1, 333 text tokens)", "",
              "| blocks | image tokens | compute | baseline ms | FP8 weight-only ms | ratio |", "|---|---|---|---|---|---|"]
    for r in results["forward"]:
        lines.append(f"| {r['blocks']} | {r['image_tokens']} | {r['dtype']} | {r['baseline_ms']:.0f} | {r['fp8_ms']:.0f} | {r['ratio']:.3f} |")
    lines += ["", "## Per linear (FP8 weight-only vs the same layer in the compute dtype)", "",
              "| layer | M | compute | baseline ms | FP8 ms | ratio |", "|---|---|---|---|---|---|"]
    for r in results["linears"]:
        lines.append(f"| {r['layer']} | {r['M']} | {r['dtype']} | {r['baseline_ms']:.1f} | {r['fp8_ms']:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/engine_core"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--tokens", default="1024,4096")
    parser.add_argument("--bf16-tokens", help="token counts for bf16 (default: --tokens); bf16 GEMMs are emulated on CPUs without bf16 units")
    parser.add_argument("--forward-only", action="store_true", help="skip the per-linear timings")
    parser.add_argument("--quick", action="store_true", help="two linear shapes, fp32 only, 256 tokens: a smoke run")
    args = parser.parse_args()
    dtypes = ["fp32"] if args.quick else args.dtypes.split(",")
    tokens = [256] if args.quick else [int(t) for t in args.tokens.split(",")]
    tokens_for = {d: tokens for d in dtypes}
    if args.bf16_tokens and not args.quick:
        tokens_for["bf16"] = [int(t) for t in args.bf16_tokens.split(",")]
    import sys

    results = {
        "command": " ".join(["python"] + sys.argv), "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
    }
    try:
        results["machine"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print("transformer bytes", flush=True)
    results["bytes"] = transformer_bytes()
    results["forward"], results["linears"] = [], []
    for d in dtypes:
        print(f"transformer forward ({d})", flush=True)
        results["forward"] += bench_forward(d, tokens_for[d], args.repeats, args.blocks)
    for d in [] if args.forward_only else dtypes:
        print(f"linears ({d})", flush=True)
        results["linears"] += bench_linears(d, tokens_for[d], args.repeats, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
