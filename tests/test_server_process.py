"""The server as a process: `sd3fp8 serve` prints its URL, and Ctrl-C (SIGINT) ends it cleanly,
also while a job runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server_harness import Events, free_port

ROOT = Path(__file__).parent.parent
SCRIPT = """
import sys
from pathlib import Path
from sd3fp8.server import ServerConfig, make_server
from tests.fake_backend import FakeBackend
config = ServerConfig.under(Path(sys.argv[1]), port=int(sys.argv[2]))
try:
    make_server(config, FakeBackend(step_delay=0.05), on_ready=lambda url: print(url, flush=True)).run()
except KeyboardInterrupt:  # uvicorn re-raises the signal once it has shut down
    pass
print("stopped", flush=True)
"""


def _start(args, cwd) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_listening(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(url + "prompt", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the server did not start")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cli_prints_the_url_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    process = _start([sys.executable, "-m", "sd3fp8.cli", "serve", "--port", str(port), "--no-frontend"], tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_listening(url, process)
        assert httpx.get(url + "api/object_info/KSampler").json()["KSampler"]["input"]["required"]["sampler_name"][0][0] == "euler"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert f"ComfyUI API at {url}" in stderr and "Traceback" not in stderr
    assert process.returncode == 130
    assert {p.name for p in tmp_path.iterdir()} == {"output", "input", "user"}  # its temp folder is gone


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_interrupts_the_running_job_and_exits(tmp_path):
    port = free_port()
    process = _start([sys.executable, "-c", SCRIPT, str(tmp_path), str(port)], ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_listening(url, process)
        events = Events(url.replace("http", "ws") + "ws", client_id="c")
        prompt = json.loads((ROOT / "tests" / "data" / "comfyui" / "sd3.5_simple_example.api.json").read_text())
        prompt["3"]["inputs"]["steps"] = 2000  # 100 s if nothing stopped it
        prompt["53"]["inputs"].update(width=64, height=64)
        httpx.post(url + "prompt", json={"prompt": prompt, "client_id": "c"}).raise_for_status()
        events.until(lambda m: isinstance(m, tuple) and m[0] == "progress")
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        process.kill()
    assert stdout.strip().endswith("stopped") and "Traceback" not in stderr
    assert process.returncode == 0 and elapsed < 15
