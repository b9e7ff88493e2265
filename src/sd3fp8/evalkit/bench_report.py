"""The report of `sd3fp8 bench`: a markdown table, the goals met or missed, plots, the image grid."""

from __future__ import annotations

import json
from pathlib import Path

from sd3fp8.evalkit.bench import REFERENCE
from sd3fp8.evalkit.configs import OTHER_ROUTES
from sd3fp8.evalkit.routes import EXTRA_HINT


def _number(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(report: dict) -> str:
    synthetic = report["spec"]["synthetic"]
    qref = report.get("quality_reference", REFERENCE)
    quality = f"SQNR vs {qref} (dB)" if synthetic else "PSNR vs bf16 (dB) | SSIM | adherence | Frechet dist."
    lines = [f"| config | s / step | x bf16 | transformer s / call | load s | peak memory GB | x bf16 | transformer MB | x bf16 | {quality} |",
             "|---" * (10 + (0 if synthetic else 3)) + "|"]
    for r in report["configs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} |")
            continue
        if synthetic:
            q = "ref" if r["name"] == qref else (f"{r['sqnr_db']:.1f}" if r.get("sqnr_db") is not None else "exact")
        else:
            ref = r["name"] == report["reference"]
            judged = f"{_number(r.get('adherence'), 3)} | {_number(r.get('frechet_distance'), 3)}"
            q = f"ref | ref | {judged}" if ref else f"{r['psnr']:.1f} | {r['ssim']:.4f} | {judged}"
        lines.append(
            f"| {r['name']} | {r['seconds_per_step']:.3f} | {r.get('step_time_vs_reference', float('nan')):.2f} | "
            f"{r['transformer_seconds_per_call']:.3f} | {r['load_seconds']:.1f} | {r['peak_memory_bytes'] / 1e9:.2f} | "
            f"{r.get('memory_vs_reference', float('nan')):.2f} | {r['bytes']['transformer'] / 1e6:.1f} | "
            f"{r.get('transformer_bytes_vs_reference', float('nan')):.3f} | {q} |")
    return "\n".join(lines) + "\n"


def goals(report: dict) -> list[str]:
    """The issue's goals on this machine, each met or missed (with by how much)."""
    rows = {r["name"]: r for r in report["configs"] if "error" not in r}
    ours = rows.get("fp8")
    if ours is None or REFERENCE not in rows:
        return ["goals not evaluated: fp8 (sd3fp8's default) or bf16 did not run"]
    out = []
    ratio = ours["step_time_vs_reference"]
    out.append(f"sd3fp8 (fp8) step time {ratio:.2f}x bf16 (goal <= 1.05x): {'met' if ratio <= 1.05 else 'missed'}")
    if "fp32" in rows:  # on CPUs without bf16 units, fp32 is the fast 16/32-bit baseline: say so too
        out.append(f"sd3fp8 step time {ours['seconds_per_step'] / rows['fp32']['seconds_per_step']:.2f}x fp32 "
                   f"(bf16 runs {rows[REFERENCE]['seconds_per_step'] / rows['fp32']['seconds_per_step']:.1f}x fp32's time on this device)")
    others = [r for n, r in rows.items() if n in OTHER_ROUTES]
    slower = [r["name"] for r in others if r["seconds_per_step"] < ours["seconds_per_step"]]
    out.append("faster than every other FP8 route: " + ("met" if not slower else f"missed (faster: {', '.join(slower)})"))
    key = "sqnr_db" if report["spec"]["synthetic"] else "psnr"
    if not report["spec"]["synthetic"]:
        out.append("quality is compared on " + str(len(report["spec"]["prompts"])) + " images: differences under ~0.5 dB PSNR are noise")
    better = [r["name"] for r in others if (r.get(key) or 0) > (ours.get(key) or 0) and r["bytes"]["transformer"] <= ours["bytes"]["transformer"]]
    out.append(f"quality ({key}) >= every other FP8 route at equal or fewer bytes: " + ("met" if not better else f"missed ({', '.join(better)})"))
    return out


def plots(report: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.setdefault("notes", []).append(f"plots skipped: matplotlib is not installed ({EXTRA_HINT})")
        return []
    rows = [r for r in report["configs"] if "error" not in r]
    key, label = (("sqnr_db", f"SQNR vs {report.get('quality_reference')} (dB)") if report["spec"]["synthetic"]
                  else ("psnr", "PSNR vs bf16 (dB)"))
    paths = []
    for name, y, ylabel in (("time_vs_memory.png", "seconds_per_step", "seconds per step"), ("quality_vs_memory.png", key, label)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            if r.get(y) is None or (y == key and r["name"] == (report.get("quality_reference") or REFERENCE)):
                continue  # the quality reference compares with itself: off the scale
            ax.scatter(r["peak_memory_bytes"] / 1e9, r[y])
            ax.annotate(r["name"], (r["peak_memory_bytes"] / 1e9, r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("peak memory (GB)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def write_report(report: dict, out: Path, command: str) -> list[Path]:
    from sd3fp8.evalkit.evaluation import image_grid

    out.mkdir(parents=True, exist_ok=True)
    paths = plots(report, out)
    report["goals"] = goals(report)
    if report.get("_images"):
        ok = [r for r in report["configs"] if r["name"] in report["_images"]]
        image_grid({"configs": ok, "_images": report["_images"]}).save(out / "bench_grid.png")
        paths.append(out / "bench_grid.png")
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["command"] = command
    (out / "bench.json").write_text(json.dumps(public, indent=2) + "\n")
    env = report["environment"]
    text = ["# sd3fp8 bench\n", f"`{command}`\n",
            f"{env['cpu']} ({env['cores']} cores){', ' + env['gpu'] + ' CC ' + env['compute_capability'] if 'gpu' in env else ''}; "
            f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, torchao {env['torchao']}, "
            f"optimum-quanto {env['optimum-quanto']}. Medians; ratios against bf16 from this run.\n", markdown_table(report),
            "\n" + "\n".join(f"- {g}" for g in report["goals"]) + "\n"]
    text += [f"- note: {n}\n" for n in report.get("notes", [])] + ([f"- note: {report['note']}\n"] if report.get("note") else [])
    (out / "bench.md").write_text("\n".join(text))
    return [out / "bench.json", out / "bench.md"] + paths
