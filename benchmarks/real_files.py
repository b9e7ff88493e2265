"""Real-size file benchmarks: quantize throughput and memory, FP8 vs BF16 load, a Large-shaped pipeline.

Synthetic checkpoints with the full depth and every real shape of SD3.5 Medium / Large (random
weights, generated on disk, never committed), laid out as a ComfyUI tree:

    python benchmarks/real_files.py synth --variant large --root /tmp/sd35-large   # ~32 GB of BF16 files
    python benchmarks/real_files.py run --root /tmp/sd35-large --out docs/benchmarks/real_files_large

Every measurement runs in its own process (peak RSS = that process's ru_maxrss).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.sd3_files: LDM VAE shapes

VARIANTS = {  # SD3Transformer2DModel configs (docs: ../shared/reference/sd35.md)
    "medium": dict(num_layers=24, num_attention_heads=24, pos_embed_max_size=384, dual_attention_layers=tuple(range(13))),
    "large": dict(num_layers=38, num_attention_heads=38, pos_embed_max_size=192, dual_attention_layers=()),
}


def mmdit_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    from diffusers import SD3Transformer2DModel

    from sd3fp8.io.layouts import MMDIT_PREFIX, diffusers_state_to_original

    v = VARIANTS[variant]
    config = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
                  caption_projection_dim=64 * v["num_attention_heads"], pooled_projection_dim=2048, out_channels=16,
                  qk_norm="rms_norm", **v)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    state = diffusers_state_to_original(model.state_dict(), config["num_layers"], prefix=MMDIT_PREFIX)
    return {k: tuple(t.shape) for k, t in state.items()}


def encoder_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def shapes(model):
        return {k: tuple(t.shape) for k, t in model.state_dict().items() if k != "encoder.embed_tokens.weight" and "position_ids" not in k}

    with torch.device("meta"):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                            num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                            num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    return {"clip_l": shapes(clip_l), "clip_g": shapes(clip_g), "t5xxl_fp16": shapes(t5)}


def write_synthetic(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Stream a BF16 safetensors file: values are slices of one random pool (memory: the pool + one tensor)."""
    from sd3fp8.io.quantize import Planned, build_header

    pool = (torch.randn(2**25, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    planned = [Planned(k, k, torch.bfloat16, s, "copy") for k, s in shapes.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    offset = 0
    with open(tmp, "wb") as f:
        f.write(build_header(planned, {"format": "pt", "synthetic": "sd3fp8 benchmark"}))
        for p in planned:
            n = 1
            for d in p.shape:
                n *= d
            if p.name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight", "ln_k.weight", "layer_norm.weight", "final_layer_norm.weight")):
                values = torch.ones(n, dtype=torch.bfloat16)
            else:
                start = offset % (pool.numel() - min(n, pool.numel()) + 1)
                values = pool[start:start + n] if n <= pool.numel() else pool.repeat(n // pool.numel() + 1)[:n]
                offset += 7919
            f.write(values.contiguous().view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def cmd_synth(args) -> None:
    from sd3fp8.miniature.tiny import BASIC_WORDS, build_clip_tokenizer, build_t5_tokenizer
    from tests.sd3_files import ldm_vae_state

    root = Path(args.root)
    models = root / "models"
    vae = {"first_stage_model." + k: tuple(v.shape) for k, v in ldm_vae_state(channels=(128, 256, 512, 512), layers=2).items()}
    start = time.perf_counter()
    if args.mmdit_only:  # the load measurements need the transformer alone
        write_synthetic(models / "checkpoints" / f"sd3.5_{args.variant}.safetensors", mmdit_shapes(args.variant))
        print(f"wrote {root} in {time.perf_counter() - start:.0f} s")
        return
    write_synthetic(models / "checkpoints" / f"sd3.5_{args.variant}.safetensors", mmdit_shapes(args.variant) | vae)
    for name, shapes in encoder_shapes().items():
        write_synthetic(models / "text_encoders" / f"{name}.safetensors", shapes)
    for name in ("tokenizer", "tokenizer_2"):
        build_clip_tokenizer(BASIC_WORDS, root / "tokenizers" / name)
    build_t5_tokenizer(BASIC_WORDS, root / "tokenizers" / "tokenizer_3")
    print(f"wrote {root} in {time.perf_counter() - start:.0f} s")


# ---- measurements, each in a fresh process ---------------------------------------------------

def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kB -> GB (1e9, like every size here)


def measure_quantize(src: str, dst: str, t5: str) -> dict:
    from sd3fp8.io.quantize import QuantizeOptions, quantize_file

    start = time.perf_counter()
    quantize_file(src, dst, QuantizeOptions(format="sd3fp8", granularity="channel", t5=t5, force=True))
    seconds = time.perf_counter() - start
    size = Path(src).stat().st_size
    return {"seconds": seconds, "source_gb": size / 1e9, "output_gb": Path(dst).stat().st_size / 1e9, "mb_per_s": size / 1e6 / seconds}


def measure_load(path: str, precision: str) -> dict:
    from sd3fp8 import Policy
    from sd3fp8.io.singlefile import load_mmdit

    dtype = torch.bfloat16  # the non-FP8 rest in bf16 for both: like for like (and what a GPU runs)
    start = time.perf_counter()
    model, names, _ = load_mmdit(path, Policy(transformer=precision), dtype)
    seconds = time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"seconds": seconds, "model_gb": nbytes / 1e9, "fp8_layers": len(names)}


def measure_pipeline(model: str, tokenizers: str, t5: str, offload: str, size: int, steps: int, cfg: float) -> dict:
    from sd3fp8 import Policy
    from sd3fp8._env import quiet_libraries
    from sd3fp8.engine.pipeline import SD3FP8Pipeline
    from sd3fp8.runtime import RuntimeConfig

    quiet_libraries()
    stage_peaks: dict[str, float] = {}
    current = ["load"]

    def sample():  # peak RSS per stage: /proc/self/status every 20 ms, charged to the running stage
        while True:
            rss = next(int(ln.split()[1]) * 1024 / 1e9 for ln in open("/proc/self/status") if ln.startswith("VmRSS"))
            stage_peaks[current[0]] = max(stage_peaks.get(current[0], 0.0), rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    engine = SD3FP8Pipeline.from_pretrained(model, Policy(text_encoder_3=t5), RuntimeConfig(device="cpu", offload=offload), tokenizers=tokenizers)
    load = time.perf_counter() - start
    load_rss = peak_rss_gb()
    stage = engine.stage

    @contextlib.contextmanager
    def labelled(*names):
        current[0] = "text encoders" if "text_encoder" in names else "+".join(names)
        with stage(*names) as modules:
            yield modules
        current[0] = "after " + current[0]

    engine.stage = labelled
    result = engine("a photo of a cat", steps=steps, cfg=cfg, width=size, height=size, seed=0)
    return {"load_seconds": load, "peak_rss_after_load_gb": load_rss, "generate_seconds": result.seconds,
            "peak_rss_by_stage_gb": stage_peaks, "compute_dtype": str(engine.compute_dtype), "sources": engine.sources.describe()}


def drop_page_cache() -> bool:
    """Cold-cache measurements: what a first load after a reboot sees (needs root; else warm)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def in_subprocess(kind: str, **kwargs) -> dict:
    cold = drop_page_cache()
    cmd = [sys.executable, __file__, "_measure", kind, json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"page_cache": "cold" if cold else "warm"}


def cmd_measure(args) -> None:
    fn = {"quantize": measure_quantize, "load": measure_load, "pipeline": measure_pipeline}[args.kind]
    result = fn(**json.loads(args.kwargs))
    result["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(result))


def cmd_run(args) -> None:
    root = Path(args.root)
    models = root / "models"
    (src,) = sorted((models / "checkpoints").glob("sd3.5_*.safetensors"))
    fp8_dir = root / "fp8" / "models"
    fp8_ckpt = fp8_dir / "checkpoints" / src.name
    fp8_ckpt.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
              "command": " ".join(sys.argv)}
    if "quantize" in args.parts:
        report["quantize_mmdit"] = in_subprocess("quantize", src=str(src), dst=str(fp8_ckpt), t5="keep")
        t5_src, t5_dst = models / "text_encoders" / "t5xxl_fp16.safetensors", fp8_dir / "text_encoders" / "t5xxl_fp8_sd3fp8.safetensors"
        t5_dst.parent.mkdir(parents=True, exist_ok=True)
        if t5_src.exists():  # the Medium run reuses the Large run's encoders (same shapes)
            report["quantize_t5"] = in_subprocess("quantize", src=str(t5_src), dst=str(t5_dst), t5="fp8")
        for name in ("clip_l", "clip_g"):
            link, target = fp8_dir / "text_encoders" / f"{name}.safetensors", models / "text_encoders" / f"{name}.safetensors"
            if target.exists() and not link.exists():
                link.symlink_to(target)
        print(json.dumps(report, indent=1), flush=True)
    if "load" in args.parts:  # the same file twice would be cached: FP8 comes from its own file, both cold
        report["load_bf16"] = in_subprocess("load", path=str(src), precision="bf16")
        report["load_fp8"] = in_subprocess("load", path=str(fp8_ckpt), precision="fp8-e4m3")
        # the 16-bit file straight into FP8 (quantized while streaming), against the FP8 file's load
        report["load_16bit_into_fp8"] = in_subprocess("load", path=str(src), precision="fp8-e4m3")
        print(json.dumps({k: report[k] for k in ("load_bf16", "load_fp8", "load_16bit_into_fp8")}, indent=1), flush=True)
    if "pipeline" in args.parts:
        report["pipeline_fp8_stages"] = in_subprocess("pipeline", model=str(fp8_dir.parent), tokenizers=str(root / "tokenizers"), t5="fp8",
                                                      offload="stages", size=args.size, steps=1, cfg=args.cfg)
    sizes = {p.name: p.stat().st_size / 1e9 for p in sorted(models.rglob("*.safetensors"))}
    report["bf16_file_gb"] = sizes
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth")
    p.add_argument("--variant", choices=list(VARIANTS), required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--mmdit-only", action="store_true", help="the MMDiT alone (no VAE, encoders or tokenizers)")
    p.set_defaults(func=cmd_synth)
    p = sub.add_parser("run")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="quantize,load,pipeline")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--cfg", type=float, default=3.5)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("_measure")
    p.add_argument("kind")
    p.add_argument("kwargs")
    p.set_defaults(func=cmd_measure)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
