import json
import subprocess
import sys

import pytest

from sd3fp8 import cli
from sd3fp8.engine.pnginfo import read_parameters
from sd3fp8.miniature import bundled as models


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_pngs_that_carry_their_parameters(tiny_model, tmp_path, capsys):
    out = tmp_path / "img.png"
    code, stdout, _ = run(capsys, "generate", "a small red circle", "--model", tiny_model, "--steps", 2,
                          "--width", 32, "--height", 32, "--seed", 11, "--batch", 2, "--negative", "blurry",
                          "--out", out, "--dtype", "fp32", "-q")
    assert code == 0
    paths = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    assert all(p.exists() for p in paths) and "wrote" in stdout
    params = [read_parameters(p) for p in paths]
    assert [(p["seed"], p["batch_index"]) for p in params] == [(11, 0), (11, 1)]
    assert (params[0]["sampler"], params[0]["scheduler"]) == ("euler", "normal")
    first = params[0]
    assert first["prompt"] == "a small red circle" and first["negative_prompt"] == "blurry"
    assert (first["steps"], first["width"], first["height"]) == (2, 32, 32)
    assert first["precision"] == "fp8-e4m3" and first["backend"] == "weight-only"
    assert first["model"] == str(tiny_model) and first["policy"]["transformer"] == "fp8-e4m3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-0.png", "img-1.png"]  # no temporary files left behind


def test_png_parameters_reproduce_the_image(tiny_model, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", tiny_model, "--dtype", "fp32", "-q"]
    run(capsys, "generate", "a green star", "--seed", 5, "--batch", 2, "--steps", 3, "--width", 32, "--height", 48,
        "--sampler", "DPM++ 2M", "--scheduler", "karras", "--shift", 2.5, "--out", a, *common)
    second = tmp_path / "a-1.png"
    p = read_parameters(second)
    assert (p["sampler"], p["scheduler"], p["shift"], p["batch_index"]) == ("dpmpp_2m", "karras", 2.5, 1)
    code, _, _ = run(capsys, "generate", "--from-png", second, "--out", b, *common)  # image 1 of the batch, alone
    assert code == 0
    difference = np.abs(np.asarray(Image.open(second), dtype=int) - np.asarray(Image.open(b), dtype=int))
    assert difference.max() <= 1  # batched vs alone: the same noise draw, GEMM rounding apart
    other = np.asarray(Image.open(tmp_path / "a-0.png"), dtype=int)
    assert np.abs(other - np.asarray(Image.open(b), dtype=int)).max() > 10  # ... and not image 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "100"], "width must be a multiple of 16"),
        (["--height", "100000"], "height must be a multiple of 16"),
        (["--steps", "0"], "steps must be"),
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--offload", "model", "--device", "cpu"], "needs a GPU"),
        (["--out", "x.jpg"], "--out must name a .png"),
        (["--policy", "/nonexistent.json"], "cannot read policy file"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_model, tmp_path, capsys, args, message):
    if "--model" not in args:
        args = args + ["--model", str(tiny_model)]
    code, stdout, stderr = run(capsys, "generate", "x", "--steps", "1", "--width", "32", "--height", "32", *args)
    assert code == 2
    assert message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("option,value", [("--precision", "int3"), ("--backend", "tensorrt"), ("--granularity", "block"),
                                          ("--t5", "int8"), ("--dtype", "fp64"), ("--offload", "disk"), ("--activation", "col")])
def test_enum_options_are_checked_by_the_parser(capsys, option, value):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "x", option, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {option}: invalid choice: '{value}'" in err and err.count("\n") == 1


def test_cli_choices_are_the_enums_spellings():
    from sd3fp8.cli import common, files
    from sd3fp8.fp8.linear import ActivationScaling, Backend
    from sd3fp8.fp8.numerics import FP8Format, Granularity
    from sd3fp8.io.quantize import FORMATS
    from sd3fp8.policy import Precision
    from sd3fp8.runtime import ComputeDtype, Offload

    assert set(common.PRECISIONS) <= set(Precision.choices()) and set(common.T5_PRECISIONS) <= set(Precision.choices())
    assert set(common.GRANULARITIES) <= set(Granularity.choices()) and set(FP8Format.choices(False)) == {"e4m3", "e5m2"}
    assert set(common.BACKENDS) == set(Backend.choices(False)) and set(common.ACTIVATIONS) == set(ActivationScaling.choices(False))
    assert set(common.COMPUTE_DTYPES) == set(ComputeDtype.choices(False)) and set(common.OFFLOADS) == set(Offload.choices(False))
    assert files.QUANTIZE_FORMATS == FORMATS


def test_unknown_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "x", "--colour", "red"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --colour red" in err and err.count("\n") == 1


def test_inspect_default_model_and_layers(capsys):
    code, out, _ = run(capsys, "inspect", "--layers", "--dtype", "fp32")
    assert code == 0
    assert str(models.default_model_path()) in out
    assert "transformer     MMDiT   fp8-e4m3" in out
    assert "transformer_blocks.0.attn.to_q" in out and "FP8Linear" in out and "channel scale" in out
    assert "proj_out" in out  # listed, and kept 16-bit by the default policy


def test_inspect_json_reflects_overrides(tiny_model, capsys):
    code, out, _ = run(capsys, "inspect", tiny_model, "--json", "--precision", "bf16", "--t5", "off")
    report = json.loads(out)
    assert code == 0
    assert report["components"]["transformer"]["precision"] == "bf16"
    assert report["components"]["transformer"]["fp8_layers"] == 0
    assert report["components"]["text_encoder_3"] is None


def test_policy_file_and_exclude_flag(tiny_model, tmp_path, capsys):
    policy = tmp_path / "p.toml"
    policy.write_text('granularity = "tensor"\nexclude = ["proj_out", "norm_out", "time_text_embed", "context_embedder"]\n')
    # --dtype fp32: "auto" would pick bf16 on CPUs with bf16 units, and no test may depend on the host CPU
    code, out, _ = run(capsys, "inspect", tiny_model, "--json", "--layers", "--policy", policy, "--exclude", "*.ff", "--dtype", "fp32")
    rows = {r["name"]: r for r in json.loads(out)["components"]["transformer"]["layers"]}
    assert code == 0
    assert rows["transformer_blocks.0.attn.to_q"]["granularity"] == "tensor"
    assert rows["transformer_blocks.0.ff.net.2"]["dtype"] == "float32"


def test_console_entry_point_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sd3fp8.cli", "generate", "x", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("sd3fp8: error:") and "Traceback" not in proc.stderr


HEAVY = ("torch", "diffusers", "transformers")


def imported_after(code: str) -> list[str]:
    """Heavy libraries a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return eval(proc.stdout.strip().splitlines()[-1])


def test_the_cli_starts_without_torch():
    """`sd3fp8 --help` and argument errors stay fast: importing the CLI and building every parser imports no heavy library."""
    assert imported_after("import sd3fp8.cli\nsd3fp8.cli.make_parser().parse_args(['generate', 'x'])") == []


def test_inspect_file_reads_the_header_without_torch(tmp_path):
    """`sd3fp8 inspect FILE` (header, detection, per-layer checks) needs neither torch nor diffusers."""
    import torch
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    from sd3fp8.io.quantize import QuantizeOptions, quantize_file
    from tests.test_layouts import original_from_diffusers, tiny_config

    torch.manual_seed(0)
    source = tmp_path / "mmdit.safetensors"
    save_file({k: v.contiguous() for k, v in original_from_diffusers(SD3Transformer2DModel(**tiny_config())).items()}, str(source))
    path = quantize_file(source, tmp_path / "cq.safetensors", QuantizeOptions(format="comfy-quant", granularity="tensor"))
    code = f"from sd3fp8 import cli\nassert cli.main(['inspect', {str(path)!r}]) == 0"
    assert imported_after(code) == []
