"""Absurd values on the command line: seeds beyond ComfyUI's 0..2^64-1, prompts that are not text,
sizes, counts and budgets out of range. Refused before any model is loaded."""

import json

import pytest

from sd3fp8.errors import ConfigError
from sd3fp8.sampling.noise import SEED_MAX as MAX_SEED
from sd3fp8.sampling.noise import check_seed
from tests.hostile_helpers import refused, refused_subprocess

GEN = ["--steps", "1", "--width", "32", "--height", "32", "--dtype", "fp32", "-q"]

VALUES = [
    (["--seed", "-1"], "seed must be an integer in 0..18446744073709551615"),
    (["--seed", str(2**64)], "seed must be an integer in 0..18446744073709551615"),
    (["--seed", "9" * 60], "seed must be an integer"),
    (["--batch-index", "-1"], "batch index must be an integer in 0..4095"),
    (["--seed", "1.5"], "invalid int value: '1.5'"),
    (["--cfg", "nan"], "cfg must be a number in 0..100"),
    (["--cfg", "inf"], "cfg must be a number in 0..100"),
    (["--steps", "1000000000"], "steps must be an integer in 1..1000"),
    (["--batch", "0"], "batch must be an integer in 1..64"),
    (["--width", "17"], "width must be a multiple of 16"),
    (["--negative", "blurry \ud800"], "negative prompt holds the invalid code point U+D800"),
]


@pytest.mark.parametrize("args,message", VALUES, ids=[" ".join(v[0])[:30] for v in VALUES])
def test_absurd_generate_values(capsys, tmp_path, tiny_model, args, message):
    argv = ["generate", "x", "--model", tiny_model, *GEN, *args, "--out", tmp_path / "o.png"]
    refused(capsys, argv, message, sources=[tiny_model], outputs=[tmp_path])


def test_prompt_with_a_lone_surrogate(capsys, tmp_path, tiny_model):
    """What the command line makes of bytes that are not UTF-8; the T5 tokenizer raised TypeError on it."""
    refused(capsys, ["generate", "a red \udcff circle", "--model", tiny_model, *GEN, "--out", tmp_path / "o.png"],
            ("prompt holds the invalid code point U+DCFF at position 6", "not UTF-8 on the command line"),
            sources=[tiny_model], outputs=[tmp_path])


def test_prompt_bytes_that_are_not_utf8_through_the_console(tmp_path, tiny_model):
    refused_subprocess(["generate", b"a red \xff circle", "--model", tiny_model, *GEN, "--out", tmp_path / "o.png"],
                       "U+DCFF", sources=[tiny_model], outputs=[tmp_path])


def test_seed_out_of_range_through_the_console(tmp_path, tiny_model):
    refused_subprocess(["generate", "x", "--seed", str(2**64), "--model", tiny_model, *GEN, "--out", tmp_path / "o.png"],
                       "seed must be an integer in 0..18446744073709551615", sources=[tiny_model], outputs=[tmp_path])


def test_deep_policy_through_the_console(tmp_path, tiny_model):
    policy = tmp_path / "p.json"
    policy.write_text('{"exclude": ' + "[" * 100000 + "]" * 100000 + "}")
    refused_subprocess(["generate", "x", "--model", tiny_model, "--policy", policy, *GEN, "--out", tmp_path / "o.png"],
                       ("p.json", "nested deeper than 64"), sources=[tiny_model, policy], outputs=[tmp_path])


def test_seed_range_is_comfyuis(capsys, tmp_path, tiny_model):
    """The ends of the range are accepted (and torch takes them): 0 and 2^64-1 generate."""
    from sd3fp8 import cli
    from sd3fp8.engine.pnginfo import read_parameters

    check_seed(0)
    check_seed(MAX_SEED)
    for bad in (-1, MAX_SEED + 1, True, 1.0, "1"):
        with pytest.raises(ConfigError):
            check_seed(bad)
    out = tmp_path / "top.png"
    assert cli.main(["generate", "x", "--model", str(tiny_model), *GEN, "--seed", str(MAX_SEED), "--out", str(out)]) == 0
    capsys.readouterr()
    assert read_parameters(out)["seed"] == MAX_SEED


@pytest.mark.parametrize("argv,message", [
    (["calibrate", "--count", "0"], "--count and --sensitivity-count must be in 1..10000"),
    (["eval", "--seeds", "0"], "--seeds must be in 1..1000"),
    (["bench", "--size", "12x"], "--size must be WIDTHxHEIGHT"),
    (["bench", "--repeats", "100000"], "--repeats must be in 1..100"),
])
def test_absurd_counts_in_other_commands(capsys, tmp_path, tiny_model, argv, message):
    refused(capsys, [*argv, "--model", tiny_model, "--out", tmp_path / "out"], message, sources=[tiny_model], outputs=[tmp_path])


def test_absurd_budget(capsys, tmp_path):
    from tests.test_hostile_files import calibration_data

    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(calibration_data(sensitivity=[{"name": "a", "error": 0.1, "params": 5}])))
    refused(capsys, ["policy", "--calibration", cal, "--keep-budget", "1e308", "--out", tmp_path / "p.json"],
            "--keep-budget must be a percentage in 0..100", sources=[cal], outputs=[tmp_path])
