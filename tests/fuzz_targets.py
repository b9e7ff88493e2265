"""Fuzz targets for the readers of hostile files (safetensors headers, policy and calibration
files), their hypothesis strategies, and the collector that keeps interesting inputs in
tests/data/fuzz_corpus/ (replayed by test_fuzz.py as ordinary cases).

A target returns "ok" (the input loaded and everything it promises holds) or the one-line error
it was refused with; any other exception is a bug. Collect more corpus (a longer, randomized run;
inputs that crash, or end in an error message not yet in the corpus, are kept):

    .venv/bin/python -m tests.fuzz_targets --examples 5000
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
from pathlib import Path

from hypothesis import strategies as st

CORPUS = Path(__file__).parent / "data" / "fuzz_corpus"
KINDS = {"header": ".safetensors", "policy": ".json", "policy_toml": ".toml", "calibration": ".json"}


def _error_line(e: Exception) -> str:
    text = str(e)
    assert "\n" not in text, f"multi-line error: {text!r}"
    return text


def header_target(data: bytes, path: Path) -> str:
    from sd3fp8.errors import SD3FP8Error
    from sd3fp8.io.checkpoint import LazyTensors, read_header

    path.write_bytes(data)
    try:
        header = read_header(path)
        with LazyTensors(path) as files:  # every accepted tensor must also be readable as its shape
            for name, info in header.tensors.items():
                assert tuple(files.get(name).shape) == info.shape
    except SD3FP8Error as e:
        return _error_line(e)
    return "ok"


def policy_target(data: bytes, path: Path) -> str:
    from sd3fp8.errors import SD3FP8Error
    from sd3fp8.policy import Policy

    path.write_bytes(data)
    try:
        policy = Policy.load(path)
        str(policy), policy.layer_filter("transformer")("transformer_blocks.0.attn.to_q")
        assert Policy.from_dict(policy.to_dict()) == policy
    except SD3FP8Error as e:
        return _error_line(e)
    return "ok"


def calibration_target(data: bytes, path: Path) -> str:
    from sd3fp8.errors import SD3FP8Error
    from sd3fp8.fp8.calibration import Calibration

    path.write_bytes(data)
    try:
        cal = Calibration.load(path)
        scales = cal.input_scales()
        assert all(math.isfinite(s) and s > 0 for s in scales.values())
        again = Calibration.load(cal.save(path.with_name("again.json")))  # what we write loads back the same
        assert again == cal
    except SD3FP8Error as e:
        return _error_line(e)
    return "ok"


TARGETS = {"header": header_target, "policy": policy_target, "policy_toml": policy_target, "calibration": calibration_target}

# --- strategies ----------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)
DTYPES = ["F8_E4M3", "F8_E5M2", "BF16", "F16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "Q4_K", "f32", ""]
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES) | json_values,
    "shape": st.lists(st.sampled_from([0, 1, 2, 3, 4, 2**31, 2**62, 2**63, 2**64, -1]) | st.integers(0, 8), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-1, 80) | st.sampled_from([2**63, 2**64]), min_size=2, max_size=2) | json_values,
})
metadata = st.dictionaries(st.sampled_from(["format", "_quantization_metadata", "sd3fp8_format_version", "x"]),
                           st.text(max_size=6) | json_values | st.builds(json.dumps, json_values), max_size=3)
header_objects = st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), entries | metadata | json_values, max_size=4)


def _dumps(value) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


def _frame(blob: bytes, data: bytes, length: int | None = None) -> bytes:
    return (len(blob) if length is None else length).to_bytes(8, "little") + blob + data


VALID_HEADER = _dumps({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                       "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}})


@st.composite
def mutated(draw, base: bytes):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif len(data) > 1:
            del data[i]
    return bytes(data)


headers = st.one_of(
    st.builds(_frame, st.builds(_dumps, header_objects), st.binary(max_size=64)),
    st.builds(_frame, mutated(VALID_HEADER), st.just(b"\0" * 24)),
    st.builds(_frame, st.binary(max_size=64), st.binary(max_size=16)),
    st.builds(_frame, st.builds(lambda d: b'{"a": ' + b"[" * d + b"]" * d + b"}", st.integers(1, 3000)), st.just(b"")),
    st.builds(_frame, st.just(VALID_HEADER), st.binary(max_size=32), st.integers(0, 2**64 - 1)),
    st.binary(max_size=16),
)

POLICY_FIELDS = ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "granularity", "include", "exclude",
                 "encoder_exclude", "other"]
policy_values = st.sampled_from(["fp8", "fp8-e5m2", "bf16", "fp16", "fp32", "auto", "off", "tensor", "channel", "none", "*"]) | \
    st.lists(st.text(max_size=8), max_size=3) | json_values
policy_objects = st.dictionaries(st.sampled_from(POLICY_FIELDS), policy_values, max_size=4)
policies = st.one_of(st.builds(_dumps, policy_objects), st.builds(_dumps, json_values), mutated(_dumps({"exclude": ["a"], "vae": "bf16"})),
                     st.binary(max_size=64))
toml_policies = st.one_of(st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
                          st.builds(lambda k, v: f"{k} = {json.dumps(v)}".encode("utf-8", "surrogatepass"), st.sampled_from(POLICY_FIELDS),
                                    policy_values),
                          st.builds(lambda d: ("a = " + "[" * d + "]" * d).encode(), st.integers(1, 2000)))


def valid_calibration() -> dict:
    return {"format": "sd3fp8-calibration", "version": 1, "fingerprint": "0" * 16, "model": "m", "prompts": ["a"], "seeds": [0],
            "steps": 2, "cfg": 3.0, "size": [64, 64], "timesteps": [1000.0, 500.0], "method": "max", "percentile": None,
            "stats": {"l": {"amax": [1.0, 2.0], "p99": [0.5, 0.6], "p99.9": [0.7, 0.8], "p99.99": [0.9, 1.0]}},
            "sensitivity": [{"name": "l", "error": 0.1, "params": 4}], "transformer_params": 10}


numbers = st.floats() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 1e-40, 3.5e38, 99.9, 99.99])
calibration_changes = st.dictionaries(
    st.sampled_from(list(valid_calibration()) + ["other"]),
    json_values | numbers | st.lists(numbers, max_size=3) | st.sampled_from(["max", "percentile", "sd3fp8-calibration"]),
    max_size=3)
stats_changes = st.dictionaries(st.sampled_from(["amax", "p99", "p99.9", "p99.99", "p50"]),
                                st.lists(numbers, max_size=3) | json_values, max_size=2)


@st.composite
def calibrations(draw) -> bytes:
    data = valid_calibration()
    data.update(draw(calibration_changes))
    if draw(st.booleans()) and isinstance(data.get("stats"), dict):
        data["stats"] = {"l": {**valid_calibration()["stats"]["l"], **draw(stats_changes)}}
    return json.dumps(data).encode("utf-8", "surrogatepass")


STRATEGIES = {"header": headers, "policy": policies, "policy_toml": toml_policies, "calibration": calibrations()}


# --- corpus --------------------------------------------------------------------------------------

def shape_of(outcome: str) -> str:
    """An outcome without its file, names, numbers and details: what makes two inputs the same kind of case."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'X'", outcome.replace("FILE", ""))
    text = re.split(r" got | \(|: expected", re.sub(r"[-+]?\d[\d.e+]*", "N", text))[0]
    return text[:60]


def outcome_of(kind: str, data: bytes, path: Path) -> str:
    """The target's outcome with the file's path replaced by FILE: what the replay test compares."""
    return TARGETS[kind](data, path).replace(str(path), "FILE")


def manifest() -> dict:
    path = CORPUS / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_manifest(entries: dict) -> None:
    (CORPUS / "manifest.json").write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")


def collect(examples: int, keep_crashes: bool) -> None:
    """Run each target on random inputs; keep inputs whose outcome is a new kind (``shape_of``).
    ``keep_crashes``: keep only inputs that raise, one per exception type (run against older code
    to keep what broke it; ``--refresh`` then records what the current code says)."""
    from hypothesis import HealthCheck, given, settings

    CORPUS.mkdir(parents=True, exist_ok=True)
    entries = manifest()
    seen = {(e["kind"], shape_of(e["expect"])) for e in entries.values()}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, strategy in STRATEGIES.items():
            path = Path(tmp) / f"x{KINDS[kind]}"

            @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(strategy)
            def run(data):
                try:
                    outcome = outcome_of(kind, data, path)
                except Exception as e:  # noqa: BLE001  (only with keep_crashes: re-raised otherwise)
                    if not keep_crashes:
                        raise
                    outcome = f"crash: {type(e).__name__}"
                if (kind, shape_of(outcome)) not in seen and (outcome.startswith("crash") or not keep_crashes):
                    seen.add((kind, shape_of(outcome)))
                    name = f"{kind}-{len(entries):03d}{KINDS[kind]}"
                    (CORPUS / name).write_bytes(data)
                    entries[name] = {"kind": kind, "expect": outcome, "found": outcome if outcome.startswith("crash") else "new outcome"}

            run()
    save_manifest(entries)
    print(f"{len(entries)} corpus entries in {CORPUS}")


def refresh() -> None:
    """Recompute every corpus entry's expected outcome with the current code (after a fix)."""
    entries = manifest()
    with tempfile.TemporaryDirectory() as tmp:
        for name, entry in entries.items():
            entry["expect"] = outcome_of(entry["kind"], (CORPUS / name).read_bytes(), Path(tmp) / f"x{KINDS[entry['kind']]}")
    save_manifest(entries)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--keep-crashes", action="store_true", help="record exceptions as outcomes (run against older code)")
    parser.add_argument("--refresh", action="store_true", help="recompute the expected outcomes with the current code")
    args = parser.parse_args()
    refresh() if args.refresh else collect(args.examples, args.keep_crashes)
