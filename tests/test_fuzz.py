"""The fuzz targets in CI: bounded, derandomized hypothesis runs (no example database, the same
examples every run, a few seconds each), and the kept corpus of interesting inputs replayed as
ordinary cases with their exact expected outcomes (see tests/fuzz_targets.py to collect more)."""

import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzz_targets as ft

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=ft.headers)
def test_fuzz_safetensors_header(scratch, data):
    ft.header_target(data, scratch / "x.safetensors")


@FUZZ
@given(data=ft.policies)
def test_fuzz_policy_json(scratch, data):
    ft.policy_target(data, scratch / "p.json")


@FUZZ
@given(data=ft.toml_policies)
def test_fuzz_policy_toml(scratch, data):
    ft.policy_target(data, scratch / "p.toml")


@FUZZ
@given(data=ft.calibrations())
def test_fuzz_calibration(scratch, data):
    ft.calibration_target(data, scratch / "c.json")


ENTRIES = sorted(ft.manifest().items())


def test_corpus_covers_every_target():
    assert {e["kind"] for _, e in ENTRIES} == set(ft.TARGETS)
    assert sum(e["expect"] == "ok" for _, e in ENTRIES) >= 3 and sum(e["expect"] != "ok" for _, e in ENTRIES) >= 30


@pytest.mark.parametrize("name,entry", ENTRIES, ids=[n for n, _ in ENTRIES])
def test_corpus_replays(tmp_path, name, entry):
    data = (ft.CORPUS / name).read_bytes()
    assert ft.outcome_of(entry["kind"], data, tmp_path / f"x{ft.KINDS[entry['kind']]}") == entry["expect"]
