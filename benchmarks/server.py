"""`sd3fp8 serve` against the engine called directly, on the bundled miniature model. Run by hand.

    .venv/bin/python benchmarks/server.py --out docs/benchmarks/server.json [--jobs 10] [--clients 20 --per-client 5] [--threads 1]

1. Overhead per job (with the server's default latent2rgb previews, and without): the same generation (64x64, 20 steps, euler/normal, cfg 3, ComfyUI text
   encoding, a new prompt text each time so nothing is cached) as a websockets_api_example.py client
   sees it (POST /prompt -> WS `executing` None -> GET /history -> GET /view: PNG bytes in hand)
   vs `engine.generate` + PNG encoding in this process. Server and direct jobs alternate, so load
   from the rest of the machine falls on both alike; the server is a separate `sd3fp8 serve` process.
   Wall time and CPU time (the server process's, all its threads, vs this process's): on a shared
   machine the CPU time is the steadier measure of the work each side does.
2. A fresh server's first prompt (loads the model, encodes) vs the same prompt reseeded (neither).
3. N clients, each with its own WebSocket, queueing M prompts at once; every result must be in
   GET /history with status success and no request may fail.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import httpx
from websockets.sync.client import connect

warnings.filterwarnings("ignore", message="connect\\(\\) must be used as a context manager")
ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "tests" / "data" / "comfyui" / "sd3.5_simple_example.api.json"
SAMPLING = dict(steps=20, cfg=3.0, sampler_name="euler", scheduler="normal")  # the miniature model's recipe
COLOURS, SHAPES, PLACES = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle"), ("top left", "center", "bottom right")


def prompt_text(i: int) -> str:
    return f"a {COLOURS[i % 4]} {SHAPES[i // 4 % 3]} in the {PLACES[i // 12 % 3]} on a white background, number {i}"


def api_prompt(text: str, seed: int, steps: int = SAMPLING["steps"]) -> dict:
    prompt = json.loads(TEMPLATE.read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "mini-sd3"
    prompt["16"]["inputs"]["text"] = text
    prompt["53"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"].update(SAMPLING, seed=seed, steps=steps)
    return prompt


class Server:
    """`sd3fp8 serve` in its own process (fp32 compute: the same numbers on every CPU)."""

    def __init__(self, folder: Path, port: int):
        args = [sys.executable, "-m", "sd3fp8.cli", "serve", "--port", str(port), "--no-frontend", "--device", "cpu",
                "--dtype", "fp32", "--output", str(folder / "output"), "--input", str(folder / "input"),
                "--user-dir", str(folder / "user"), "--max-queue", "1000"]
        self.url = f"http://127.0.0.1:{port}/"
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sd3fp8 serve exited: {self.process.stderr.read()}")
            try:
                if httpx.get(self.url + "prompt", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("sd3fp8 serve did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


class Client:
    """What websockets_api_example.py does, with timings."""

    def __init__(self, url: str):
        self.url, self.client_id = url, str(uuid.uuid4())
        self.http = httpx.Client(base_url=url, timeout=600)
        self.ws = connect(url.replace("http://", "ws://") + f"ws?clientId={self.client_id}", max_size=None)

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        prompt_id = str(uuid.uuid4())
        body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        body = json.dumps({**body, "extra_data": extra_data} if extra_data else body).encode()
        self.http.post("/prompt", content=body).raise_for_status()
        return prompt_id

    def wait(self, prompt_ids: set[str]) -> None:
        pending = set(prompt_ids)
        while pending:
            message = self.ws.recv(timeout=900)
            if isinstance(message, str):
                event = json.loads(message)
                if event["type"] == "executing" and event["data"]["node"] is None:
                    pending.discard(event["data"]["prompt_id"])

    def fetch(self, prompt_id: str) -> tuple[dict, list[bytes]]:
        entry = self.http.get(f"/history/{prompt_id}").json()[prompt_id]
        images = [self.http.get("/view", params=image).content for out in entry["outputs"].values() for image in out["images"]]
        return entry, images

    def job(self, prompt: dict, extra_data: dict | None = None) -> tuple[float, float]:
        """(seconds from POST to PNG bytes, seconds the server's executor took)."""
        start = time.perf_counter()
        prompt_id = self.queue(prompt, extra_data)
        self.wait({prompt_id})
        entry, images = self.fetch(prompt_id)
        seconds = time.perf_counter() - start
        assert entry["status"]["status_str"] == "success" and images and images[0][:4] == b"\x89PNG", entry["status"]
        stamps = dict(entry["status"]["messages"])
        return seconds, (stamps["execution_success"]["timestamp"] - stamps["execution_start"]["timestamp"]) / 1000

    def close(self) -> None:
        self.ws.close()
        self.http.close()


def direct_job(engine, text: str, seed: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one generation and its PNG."""
    from sd3fp8.engine.pipeline import GenerationRequest

    start, cpu = time.perf_counter(), time.process_time()
    request = GenerationRequest(text, "", steps=SAMPLING["steps"], cfg=SAMPLING["cfg"], seed=seed, width=64, height=64,
                                sampler="euler", scheduler="normal", text_mode="comfy")
    image = engine.generate(request).images[0]
    image.save(io.BytesIO(), format="PNG", compress_level=4)  # what SaveImage writes
    return time.perf_counter() - start, time.process_time() - cpu


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overhead(server: Server, jobs: int) -> dict:
    """Part 1: direct jobs, served jobs and served jobs without previews, in rotating order after a
    warm-up; wall time and the CPU time each side spent (this process for direct jobs, the server
    process for served ones). Overheads are medians of per-round ratios, with their quartiles."""
    from sd3fp8.engine.pipeline import SD3FP8Pipeline
    from sd3fp8.runtime import RuntimeConfig

    engine = SD3FP8Pipeline.from_pretrained(None, runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    client = Client(server.url)
    client.job(api_prompt(prompt_text(999), 0)), direct_job(engine, prompt_text(998), 0)  # load, warm up
    arms = ("direct", "served", "served_no_previews")
    runs = {f"{arm}_{kind}": [] for arm in arms for kind in ("s", "cpu_s")}
    for i in range(jobs):
        for arm in arms[i % 3:] + arms[: i % 3]:
            if arm == "direct":
                wall, cpu = direct_job(engine, prompt_text(i), i)
            else:
                before = process_cpu(server.process.pid)
                extra = {"preview_method": "none"} if arm == "served_no_previews" else {}
                wall = client.job(api_prompt(prompt_text((2 if extra else 1) * 1000 + i), i), extra)[0]
                cpu = process_cpu(server.process.pid) - before
            runs[f"{arm}_s"].append(wall), runs[f"{arm}_cpu_s"].append(cpu)
    client.close()
    out = {"jobs": jobs, **runs}
    for arm in arms[1:]:
        for kind in ("s", "cpu_s"):
            ratios = [100 * (a / b - 1) for a, b in zip(runs[f"{arm}_{kind}"], runs[f"direct_{kind}"])]
            out[f"{arm}_overhead_{'wall' if kind == 's' else 'cpu'}_percent"] = quartiles(ratios)
    out.update({f"{k}_median": statistics.median(v) for k, v in runs.items()})
    return out


def quartiles(values: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return {"median": median, "q1": q1, "q3": q3}


def reseed(folder: Path, port: int) -> dict:
    """Part 2: a fresh server's first prompt, then the same prompt with a new seed (3 times)."""
    server = Server(folder, port)
    try:
        client = Client(server.url)
        first = client.job(api_prompt(prompt_text(7), 1))[0]
        again = [client.job(api_prompt(prompt_text(7), seed))[0] for seed in (2, 3, 4)]
        text = [client.job(api_prompt(prompt_text(8 + seed), seed))[0] for seed in (5, 6, 7)]  # new text: encoded, model loaded
        client.close()
    finally:
        server.stop()
    return {"first_s": first, "reseeded_s": again, "new_text_s": text, "reseeded_median_s": statistics.median(again),
            "speedup_first_over_reseeded": first / statistics.median(again)}


def many_clients(url: str, clients: int, per_client: int, steps: int) -> dict:
    """Part 3: every client queues its prompts at once and waits for all of them."""
    errors, ids, lock = [], {}, threading.Lock()

    def one(c: int) -> None:
        try:
            client = Client(url)
            mine = {client.queue(api_prompt(prompt_text(c * per_client + k), k, steps)) for k in range(per_client)}
            with lock:
                ids.update(dict.fromkeys(mine, c))
            client.wait(mine)
            client.close()
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"client {c}: {type(e).__name__}: {e}")

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    history = httpx.get(url + "history", timeout=60).json()
    done = [pid for pid in ids if history.get(pid, {}).get("status", {}).get("status_str") == "success"]
    return {"clients": clients, "per_client": per_client, "steps": steps, "prompts": len(ids), "errors": errors,
            "in_history_success": len(done), "seconds": seconds, "prompts_per_s": len(ids) / seconds}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--jobs", type=int, default=30, help="rounds of the overhead part (one job per arm each)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=5)
    parser.add_argument("--client-steps", type=int, default=4, help="steps of the concurrent clients' prompts")
    parser.add_argument("--port", type=int, default=8190)
    parser.add_argument("--threads", type=int, help="torch threads in both processes (OMP_NUM_THREADS); default: torch's")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process reads it at start
        import torch

        torch.set_num_threads(args.threads)
    results = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    with tempfile.TemporaryDirectory(prefix="sd3fp8-bench-serve-") as tmp:
        results["reseed"] = reseed(Path(tmp) / "fresh", args.port)
        print(json.dumps(results["reseed"], indent=1), flush=True)
        server = Server(Path(tmp) / "main", args.port + 1)
        try:
            results["overhead"] = overhead(server, args.jobs)
            print(json.dumps({k: v for k, v in results["overhead"].items() if not k.endswith("_s")}, indent=1), flush=True)
            results["clients"] = many_clients(server.url, args.clients, args.per_client, args.client_steps)
            print(json.dumps(results["clients"], indent=1), flush=True)
        finally:
            server.stop()
    results["machine"]["load_average_after"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
