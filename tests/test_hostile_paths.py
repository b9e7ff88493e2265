"""Hostile paths and file systems: outputs that are directories or sit under a file, read-only
and full disks (a real tmpfs where this machine allows mounting one, and always a simulated OSError
so the logic is tested everywhere), interrupted writes and stale partial files."""

import collections
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sd3fp8.io import oserrors
from tests.hostile_helpers import copy_model, listing, refused, tree_digest

GEN = ["--steps", "1", "--width", "32", "--height", "32", "--dtype", "fp32", "-q"]


@pytest.fixture
def afile(tmp_path):
    path = tmp_path / "afile"
    path.write_text("I am a file")
    return path


# --- paths ---------------------------------------------------------------------------------------

def test_generate_out_is_a_directory(capsys, tmp_path, tiny_model):
    (tmp_path / "x.png").mkdir()
    refused(capsys, ["generate", "x", "--model", tiny_model, *GEN, "--out", tmp_path / "x.png"], ("x.png", "is a directory"),
            sources=[tiny_model], outputs=[tmp_path])


@pytest.mark.parametrize("under", ["x.png", "sub/x.png"])
def test_generate_out_under_a_file(capsys, tmp_path, tiny_model, afile, under):
    refused(capsys, ["generate", "x", "--model", tiny_model, *GEN, "--out", afile / under], (str(afile), "is a file, not a folder"),
            sources=[tiny_model, afile], outputs=[tmp_path])


def test_quantize_out_is_a_directory(capsys, tmp_path, tiny_files):
    (tmp_path / "q.safetensors").mkdir()
    refused(capsys, ["quantize", tiny_files["mmdit"], "--out", tmp_path / "q.safetensors", "--force", "-q"], "is a directory",
            sources=[tiny_files["mmdit"]], outputs=[tmp_path])


def test_quantize_out_under_a_file(capsys, tmp_path, tiny_files, afile):
    refused(capsys, ["quantize", tiny_files["mmdit"], "--out", afile / "q.safetensors", "-q"], "afile is a file, not a folder",
            sources=[tiny_files["mmdit"], afile], outputs=[tmp_path])


def test_calibrate_out_under_a_file_is_refused_before_calibrating(capsys, tmp_path, tiny_model, afile):
    refused(capsys, ["calibrate", "--model", tiny_model, "--out", afile / "cal.json", "--samples", "1", "--steps", "1", "-q"],
            "afile is a file, not a folder", sources=[tiny_model, afile], outputs=[tmp_path])


def test_eval_out_is_a_file(capsys, tmp_path, tiny_model, afile):
    refused(capsys, ["eval", "--model", tiny_model, "--out", afile, "--count", "1", "--seeds", "1", "-q"],
            "afile is a file, not a folder", sources=[tiny_model, afile], outputs=[tmp_path])


def test_policy_file_is_a_directory(capsys, tmp_path, tiny_model):
    (tmp_path / "p.json").mkdir()
    refused(capsys, ["generate", "x", "--model", tiny_model, "--policy", tmp_path / "p.json", *GEN, "--out", tmp_path / "o.png"],
            ("cannot read policy file", "is a directory"), sources=[tiny_model], outputs=[tmp_path])


def test_model_under_a_file(capsys, tmp_path, afile):
    refused(capsys, ["generate", "x", "--model", afile / "model", *GEN, "--out", tmp_path / "o.png"], "does not exist",
            sources=[afile], outputs=[tmp_path])


def test_quantize_onto_its_source_and_onto_an_existing_file(capsys, tmp_path, tiny_files):
    src = tiny_files["mmdit"]
    refused(capsys, ["quantize", src, "--out", src, "--force", "-q"], "refusing to overwrite the source", sources=[src])
    existing = tmp_path / "q.safetensors"
    existing.write_bytes(b"keep me")
    refused(capsys, ["quantize", src, "--out", existing, "-q"], "pass --force", sources=[src, existing], outputs=[tmp_path])
    refused(capsys, ["quantize", tmp_path, "--out", tmp_path / "x.safetensors", "-q"], "is not a file", outputs=[tmp_path])


# --- read-only and full disks: simulated (always) -------------------------------------------------

def test_read_only_disk_simulated(capsys, tmp_path, tiny_model, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(oserrors.tempfile, "mkstemp", read_only)
    refused(capsys, ["generate", "x", "--model", tiny_model, *GEN, "--out", tmp_path / "o.png"],
            ("cannot write", "o.png", "read-only"), sources=[tiny_model], outputs=[tmp_path])


def test_full_disk_found_before_generating_simulated(capsys, tmp_path, tiny_model, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(oserrors.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    refused(capsys, ["generate", "x", "--model", tiny_model, *GEN, "--out", tmp_path / "o.png"], ("o.png", "needs", "0.0 MiB free"),
            sources=[tiny_model], outputs=[tmp_path])


def test_full_disk_mid_quantize_simulated(capsys, tmp_path, tiny_files, monkeypatch):
    from sd3fp8.io import quantize

    real, calls = quantize._tensor_bytes, []

    def filling(tensor):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensor)

    monkeypatch.setattr(quantize, "_tensor_bytes", filling)
    refused(capsys, ["quantize", tiny_files["mmdit"], "--out", tmp_path / "q.safetensors", "-q"],
            ("cannot write", "q.safetensors", "no space left"), sources=[tiny_files["mmdit"]], outputs=[tmp_path])


def test_full_disk_when_saving_the_png_simulated(capsys, tmp_path, tiny_model, monkeypatch):
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    refused(capsys, ["generate", "x", "--model", tiny_model, *GEN, "--out", tmp_path / "o.png"], ("o.png", "no space left"),
            sources=[tiny_model], outputs=[tmp_path])


def test_rename_refused_by_a_read_only_remount_simulated(capsys, tmp_path, tiny_files, monkeypatch):
    from sd3fp8.io import atomic

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", src)

    monkeypatch.setattr(atomic.os, "replace", read_only)
    refused(capsys, ["quantize", tiny_files["mmdit"], "--out", tmp_path / "q.safetensors", "-q"], ("q.safetensors", "read-only"),
            sources=[tiny_files["mmdit"]], outputs=[tmp_path])


# --- read-only and full disks: a real tmpfs -----------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (root, and a kernel that lets this container mount one), else the test is skipped."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the simulated-OSError tests cover the logic")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the simulated-OSError tests cover the logic")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def remount_read_only(mnt):
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)


def fill(mnt, leave: int):
    """Fill the file system until at most ``leave`` bytes are free."""
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(mnt / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
            f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("command", ["generate", "quantize", "calibrate"])
def test_read_only_file_system(capsys, tmp_path, tiny_model, tiny_files, tmpfs, command):
    remount_read_only(tmpfs)
    if command == "generate":
        argv = ["generate", "x", "--model", tiny_model, *GEN, "--out", tmpfs / "o.png"]
    elif command == "quantize":
        argv = ["quantize", tiny_files["mmdit"], "--out", tmpfs / "q.safetensors", "-q"]
    else:
        argv = ["calibrate", "--model", tiny_model, "--out", tmpfs / "c.json", "--samples", "1", "-q"]
    refused(capsys, argv, (str(tmpfs), "read-only"), sources=[tiny_model, tiny_files["mmdit"]], outputs=[tmpfs])


def test_full_file_system_found_before_work(capsys, tiny_model, tiny_files, tmpfs):
    fill(tmpfs, leave=8192)
    sources = [tiny_model, tiny_files["mmdit"]]
    refused(capsys, ["quantize", tiny_files["mmdit"], "--out", tmpfs / "q.safetensors", "-q"], ("q.safetensors", "needs"),
            sources=sources, outputs=[tmpfs])
    refused(capsys, ["generate", "x", "--model", tiny_model, *GEN, "--out", tmpfs / "o.png"], ("o.png", "needs"),
            sources=sources, outputs=[tmpfs])


def test_full_file_system_mid_write(capsys, tiny_files, tmpfs, monkeypatch):
    """The disk fills while writing (the early check is bypassed, as when another process fills it)."""
    from sd3fp8.io import quantize

    monkeypatch.setattr(quantize, "check_output_file", lambda *a, **k: None)
    fill(tmpfs, leave=16384)
    refused(capsys, ["quantize", tiny_files["mmdit"], "--out", tmpfs / "q.safetensors", "-q"], ("q.safetensors", "no space left"),
            sources=[tiny_files["mmdit"]], outputs=[tmpfs])


# --- interrupted writes --------------------------------------------------------------------------

def test_ctrl_c_mid_quantize_leaves_nothing(capsys, tmp_path, tiny_files, monkeypatch):
    from sd3fp8.io import quantize

    real, calls = quantize.quantize_weight, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize, "quantize_weight", interrupted)
    refused(capsys, ["quantize", tiny_files["mmdit"], "--out", tmp_path / "q.safetensors", "-q"], "sd3fp8: interrupted",
            sources=[tiny_files["mmdit"]], outputs=[tmp_path], code=130)


WRITER = textwrap.dedent("""
    import sys, time
    from sd3fp8.io.atomic import atomic_write
    with atomic_write(sys.argv[1]) as f:
        f.write(b"half a checkpoint")
        f.flush()
        print("writing", flush=True)
        time.sleep(600)
""")


def start_writer(dst):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(dst)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_killed_writer_leaves_a_partial_that_the_next_run_removes(capsys, tmp_path, tiny_files):
    dst = tmp_path / "q.safetensors"
    proc = start_writer(dst)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(stale) == 1 and not dst.exists()  # what an interrupted run used to leave forever
    from sd3fp8 import cli

    assert cli.main(["quantize", str(tiny_files["mmdit"]), "--out", str(dst), "-q"]) == 0
    capsys.readouterr()
    assert dst.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_live_writers_partial_is_left_alone(tmp_path):
    from sd3fp8.io.atomic import atomic_write, remove_stale_partials

    dst = tmp_path / "q.safetensors"
    proc = start_writer(dst)
    try:
        before = listing(tmp_path)
        assert remove_stale_partials(dst) == []
        with atomic_write(tmp_path / "other.safetensors") as f:  # another destination: not touched either
            f.write(b"x")
        assert before <= listing(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    assert len(remove_stale_partials(dst)) == 1


def test_interrupted_generate_writes_no_png(capsys, tmp_path, tiny_model, monkeypatch):
    from sd3fp8.engine.pipeline import SD3FP8Pipeline

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SD3FP8Pipeline, "generate", interrupted)
    before = tree_digest(tiny_model)
    refused(capsys, ["generate", "x", "--model", tiny_model, *GEN, "--out", tmp_path / "o.png"], "interrupted",
            sources=[tiny_model], outputs=[tmp_path], code=130)
    assert tree_digest(tiny_model) == before


def test_copied_model_is_the_same_bytes(tmp_path, tiny_model):
    """The helpers' byte-identity check sees a one-byte change (so the contract's check can fail)."""
    model = copy_model(tiny_model, tmp_path / "m")
    before = tree_digest(model)
    config = model / "vae" / "config.json"
    config.write_bytes(config.read_bytes() + b" ")
    assert tree_digest(model) != before
