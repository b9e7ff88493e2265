"""Hostile files: corrupt safetensors headers, JSON of the wrong type, deep JSON, huge numbers and
text that is not UTF-8, in every file kind we read. Each case drives the real CLI and checks the
contract in ``hostile_helpers.check_contract`` (one line, no traceback, nothing written, sources
unchanged)."""

import json

import pytest

from tests.hostile_helpers import GOOD_ENTRY, copy_model, raw_safetensors, refused

DEEP = "[" * 5000 + "]" * 5000
GEN = ["--steps", "1", "--width", "32", "--height", "32", "--dtype", "fp32", "-q"]

# (case, header: JSON-able object or raw bytes, data section, what the error line must say)
HEADERS = [
    ("deep-nesting", b'{"w": {"dtype": "F32", "shape": ' + DEEP.encode() + b', "data_offsets": [0, 8]}}', 8, "nested deeper than 64"),
    ("huge-integer", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}", 8, "integer of 5001 digits"),
    ("not-utf8", b'{"w\xff": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "not UTF-8"),
    ("duplicate-name", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                       b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "duplicate key 'w'"),
    ("int64-overflow", {"w": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, 0, "beyond what int64"),
    ("dim-beyond-int64", {"w": {"dtype": "U8", "shape": [2**64], "data_offsets": [0, 8]}}, 8, "invalid shape"),
    ("dtype-list", {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, 8, "unsupported dtype of type list"),
    ("bool-shape", {"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
    ("offsets-object", {"w": {"dtype": "F32", "shape": [2], "data_offsets": {"a": 0, "b": 8}}}, 8, "invalid offsets"),
    ("entry-string", {"w": "F32"}, 8, "malformed header entry"),
    ("header-list", [GOOD_ENTRY], 8, "not a JSON object"),
    ("metadata-list", {"__metadata__": ["format", "pt"], "w": GOOD_ENTRY}, 8, "JSON object for '__metadata__'"),
    ("metadata-number", {"__metadata__": {"format": 1}, "w": GOOD_ENTRY}, 8, "must be strings; 'format' is an integer"),
    ("quant-meta-object", {"__metadata__": {"_quantization_metadata": {"layers": {}}}, "w": GOOD_ENTRY}, 8,
     "'_quantization_metadata' is an object"),
    ("quant-meta-not-json", {"__metadata__": {"_quantization_metadata": "{layers"}, "w": GOOD_ENTRY}, 8,
     "_quantization_metadata is not valid JSON"),
    ("quant-meta-layers-list", {"__metadata__": {"_quantization_metadata": '{"layers": []}'}, "w": GOOD_ENTRY}, 8,
     "JSON object for 'layers'"),
    ("quant-meta-deep", {"__metadata__": {"_quantization_metadata": '{"layers": ' + DEEP + "}"}, "w": GOOD_ENTRY}, 8,
     "nested deeper than 64"),
    ("nan-offset", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}}', 8, "NaN is not a JSON number"),
    ("lone-surrogate-name", b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "U+D800"),
    ("lying-size", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 8, "header lies"),
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap"),
    ("truncated", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "truncated"),
]


@pytest.mark.parametrize("case,header,data,message", HEADERS, ids=[h[0] for h in HEADERS])
def test_corrupt_header_is_one_line(capsys, tmp_path, case, header, data, message):
    path = raw_safetensors(tmp_path / f"{case}.safetensors", header, b"\0" * data)
    refused(capsys, ["inspect", path], (message, path.name), sources=[path], outputs=[tmp_path])


def test_short_and_headerless_files(capsys, tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    refused(capsys, ["inspect", empty], "too short", sources=[empty], outputs=[tmp_path])
    long = tmp_path / "long.safetensors"
    long.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    refused(capsys, ["inspect", long], "not a safetensors file, or truncated", sources=[long], outputs=[tmp_path])


@pytest.mark.parametrize("option", ["--model", "--transformer", "--text-encoders", "--vae"])
def test_corrupt_header_in_every_model_position(capsys, tmp_path, tiny_model, tiny_files, option):
    bad = raw_safetensors(tmp_path / "bad.safetensors", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                          b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8)
    if option == "--model":
        model = ["--model", bad, "--tokenizers", tiny_model]
    elif option == "--transformer":
        model = ["--model", tiny_model, "--transformer", bad]
    else:  # a single-file MMDiT, with this as its text encoder or VAE
        model = ["--model", tiny_files["mmdit"], "--tokenizers", tiny_model, option, bad]
    refused(capsys, ["generate", "x", *model, *GEN, "--out", tmp_path / "o.png"], ("duplicate key 'w'", "bad.safetensors"),
            sources=[bad, tiny_model, tiny_files["mmdit"]], outputs=[tmp_path])


def test_quantize_refuses_a_corrupt_source_and_writes_nothing(capsys, tmp_path):
    src = raw_safetensors(tmp_path / "src.safetensors", {"w": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}})
    refused(capsys, ["quantize", src, "--out", tmp_path / "q.safetensors"], "beyond what int64", sources=[src], outputs=[tmp_path])


# --- policy files -------------------------------------------------------------------------------

POLICIES = [
    ("p.json", '{"transformer": ["fp8"]}', "field 'transformer' must be a string"),
    ("p.json", '{"exclude": {"a": 1}}', "list of name patterns"),
    ("p.json", "[]", "must be a mapping"),
    ("p.json", '{"granularity": 5}', "field 'granularity' must be a string"),
    ("p.json", '{"exclude": ' + DEEP + "}", "nested deeper than 64"),
    ("p.json", '{"transformer": ' + "9" * 5000 + "}", "integer of 5000 digits"),
    ("p.json", '{"transformer": NaN}', "NaN is not a JSON number"),
    ("p.json", b'{"transformer": "\xff"}', "not UTF-8"),
    ("p.json", '{"exclude": ["a"], "exclude": []}', "duplicate key 'exclude'"),
    ("p.json", '{"exclude": ["\\udc80"]}', "U+DC80"),
    ("p.json", " " * (2 * 2**20), "larger than 1024 KiB"),
    ("p.toml", "exclude = " + DEEP, "nested too deeply"),
    ("p.toml", "transformer = " + "9" * 5000, "Exceeds the limit"),
    ("p.toml", "transformer = [1", "not valid TOML"),
]


@pytest.mark.parametrize("name,content,message", POLICIES, ids=[f"{i}-{p[2][:20]}" for i, p in enumerate(POLICIES)])
def test_bad_policy_file_is_one_line(capsys, tmp_path, tiny_model, name, content, message):
    policy = tmp_path / name
    policy.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    refused(capsys, ["generate", "x", "--model", tiny_model, "--policy", policy, *GEN, "--out", tmp_path / "o.png"],
            (message, name), sources=[policy, tiny_model], outputs=[tmp_path])


# --- calibration files --------------------------------------------------------------------------

def calibration_data(**changes) -> dict:
    data = {"format": "sd3fp8-calibration", "version": 1, "fingerprint": "0" * 16, "model": "m", "prompts": ["a"], "seeds": [0],
            "steps": 2, "cfg": 3.0, "size": [64, 64], "timesteps": [1000.0, 500.0], "method": "max", "percentile": None,
            "stats": {"transformer_blocks.0.attn.to_q": {"amax": [1.0, 2.0], "p99": [0.5, 0.6], "p99.9": [0.7, 0.8],
                                                          "p99.99": [0.9, 1.0]}},
            "sensitivity": [], "transformer_params": 10}
    data.update(changes)
    return data


def test_calibration_baseline_is_valid(tmp_path):
    from sd3fp8.fp8.calibration import Calibration

    path = tmp_path / "c.json"
    path.write_text(json.dumps(calibration_data()))
    assert Calibration.load(path).input_scales() == {"transformer_blocks.0.attn.to_q": 2.0 / 448}


STATS = "transformer_blocks.0.attn.to_q"
CALIBRATIONS = [
    ("nan", json.dumps(calibration_data()).replace("[1.0, 2.0]", "[NaN, 2.0]"), "NaN is not a JSON number"),
    ("negative", calibration_data(stats={STATS: {"amax": [-1.0, 2.0]}}), "'stats.transformer_blocks.0.attn.to_q.amax' must be"),
    ("overflow", json.dumps(calibration_data()).replace("[1.0, 2.0]", "[1e999, 2.0]"), "number 1e999 is out of range"),
    ("percentile-string", calibration_data(method="percentile", percentile="99.9"), "field 'percentile' must be a number"),
    ("percentile-odd", calibration_data(method="percentile", percentile=42), "must be 99, 99.9 or 99.99"),
    ("stats-list", calibration_data(stats=[1, 2]), "JSON object for 'stats'"),
    ("steps-string", calibration_data(steps="2"), "field 'steps' must be an integer"),
    ("seed-negative", calibration_data(seeds=[-1]), "field 'seeds' must be a list of integers"),
    ("sensitivity-type", calibration_data(sensitivity=[{"name": 1, "error": 0.1, "params": 3}]), "sensitivity[0].name"),
    ("too-many-steps", calibration_data(stats={STATS: {"amax": [1.0, 2.0, 3.0]}}), "at most 2 items"),
    ("deep", '{"format": "sd3fp8-calibration", "stats": ' + DEEP + "}", "nested deeper than 64"),
    ("not-utf8", b'{"format": "sd3fp8-calibration\xfe"}', "not UTF-8"),
    ("list", "[]", "not an sd3fp8 calibration file"),
]


@pytest.mark.parametrize("case,content,message", CALIBRATIONS, ids=[c[0] for c in CALIBRATIONS])
def test_bad_calibration_is_refused_on_load(capsys, tmp_path, tiny_model, case, content, message):
    cal = tmp_path / "cal.json"
    cal.write_bytes(content if isinstance(content, bytes) else (content if isinstance(content, str) else json.dumps(content)).encode())
    refused(capsys, ["generate", "x", "--model", tiny_model, "--calibration", cal, *GEN, "--out", tmp_path / "o.png"],
            (message, "cal.json"), sources=[cal, tiny_model], outputs=[tmp_path])


def test_quantize_never_writes_nan_input_scales(capsys, tmp_path, tiny_files):
    """The issue's case: a NaN amax used to become 19 NaN input_scale tensors in the output."""
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(calibration_data()).replace("[1.0, 2.0]", "[NaN, 2.0]"))
    refused(capsys, ["quantize", tiny_files["mmdit"], "--out", tmp_path / "q.safetensors", "--calibration", cal],
            ("NaN", "cal.json"), sources=[cal, tiny_files["mmdit"]], outputs=[tmp_path])


# --- model folders: model_index.json, sd3fp8.json, configs, tokenizers -------------------------

FOLDER_FILES = [
    ("model_index.json", "[]", "expected a JSON object, got a list"),
    ("model_index.json", '{"_class_name": 5}', "field '_class_name' must be a string"),
    ("model_index.json", '{"_class_name": "StableDiffusion3Pipeline", "vae": {"a": 1}}', "must be [library, class]"),
    ("model_index.json", '{"_class_name": "StableDiffusion3Pipeline", "x": ' + DEEP + "}", "nested deeper than 64"),
    ("model_index.json", '{"_class_name": "StableDiffusion3Pipeline", "x": ' + "1" * 5000 + "}", "integer of 5000 digits"),
    ("model_index.json", b'{"_class_name": "StableDiffusion3Pipeline\x80"}', "not UTF-8"),
    ("sd3fp8.json", '{"defaults": {"steps": "20"}}', "field 'defaults.steps' must be an integer"),
    ("sd3fp8.json", '{"defaults": [20]}', "JSON object for 'defaults'"),
    ("sd3fp8.json", '{"defaults": ' + DEEP + "}", "nested deeper than 64"),
    ("sd3fp8.json", b'{"world": "\xc3"}', "not UTF-8"),
    ("transformer/config.json", None, "field 'num_layers' must be an integer in 1..1024, got '4'"),
    ("text_encoder/config.json", None, "field 'hidden_size' must be an integer"),
    ("scheduler/scheduler_config.json", '{"shift": ' + DEEP + "}", "nested deeper than 64"),
    ("tokenizer/vocab.json", b'{"a\xff": 1}', "not UTF-8"),
    ("tokenizer_2/merges.txt", b"#version: 0.2\n\xff\xfe\n", "not UTF-8"),
    ("tokenizer_3/tokenizer.json", '{"model": ' + DEEP + "}", "nested deeper than 64"),
]


@pytest.mark.parametrize("name,content,message", FOLDER_FILES, ids=[f"{f[0]}-{i}" for i, f in enumerate(FOLDER_FILES)])
def test_bad_file_in_a_model_folder(capsys, tmp_path, tiny_model, name, content, message):
    model = copy_model(tiny_model, tmp_path / "m")
    target = model / name
    if content is None:  # a wrong type in a config that is otherwise intact
        data = json.loads(target.read_text())
        data.update({"num_layers": "4"} if "transformer" in name else {"hidden_size": [32]})
        content = json.dumps(data)
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    out.mkdir()
    refused(capsys, ["generate", "x", "--model", model, *GEN, "--out", out / "o.png"], (message, name.rpartition("/")[2]),
            sources=[model], outputs=[out])
