"""The OpenAI endpoint under load, on the miniature model: throughput and latency with 1, 4 and 16
concurrent clients, one `sd3fp8 serve` process vs Ray Serve with N replicas; and a soak run
(hundreds of requests: errors and the server's memory). Run by hand; not a test.

    .venv/bin/python benchmarks/serve_load.py load --modes single,ray --clients 1,4,16 --out docs/benchmarks/serve_load.json
    .venv/bin/python benchmarks/serve_load.py soak --requests 300 --clients 4 --out docs/benchmarks/serve_soak.json

The single server runs in a subprocess (`serve_load.py server`) with the engine over all --threads
torch threads; Ray runs --replicas replicas with --threads / --replicas threads each, so both use
the same cores. Each request: a distinct seed, --steps steps at the model's 64x64, PNG as b64_json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- the servers --------------------------------------------------------------------------------------


def run_server(port: int, threads: int) -> None:
    """`serve_load.py server`: sd3fp8's server (ComfyUI + OpenAI + A1111 routes, one worker) over the engine."""
    import tempfile

    from sd3fp8._env import quiet_libraries
    from sd3fp8.server import ServerConfig, make_server
    from sd3fp8.server.pipeline_backend import PipelineBackend

    quiet_libraries()
    backend = PipelineBackend(threads=threads)
    backend.load_checkpoint(backend.model_files("checkpoints")[0])
    with tempfile.TemporaryDirectory() as root:
        config = ServerConfig.under(Path(root), port=port, max_queue=1000)
        make_server(config, backend, on_ready=lambda url: print(f"READY {url}", flush=True)).run()


class SingleServer:
    def __init__(self, port: int, threads: int):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, __file__, "server", "--port", str(port), "--threads", str(threads)],
                                        stdout=subprocess.PIPE, text=True, env=env)
        for line in self.process.stdout:
            if line.startswith("READY "):
                self.url = line.split()[1]
                return
        raise RuntimeError("the server did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


class RayServer:
    def __init__(self, port: int, threads: int, replicas: int, batching: bool = True):
        import ray

        from sd3fp8.scale.ray_serve import RayOptions, start
        from sd3fp8.server.pipeline_backend import PipelineBackend

        ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
        per = max(1, threads // replicas)
        options = RayOptions(replicas=replicas, num_cpus=threads / replicas, threads=per, max_batch_images=8 if batching else 1)
        self.url = start(functools.partial(PipelineBackend, threads=per), options, port=port)

    def close(self) -> None:
        from sd3fp8.scale.ray_serve import stop

        stop()


# ---- clients ----------------------------------------------------------------------------------------


def drive(url: str, clients: int, requests: int, steps: int, first_seed: int = 0) -> dict:
    """``clients`` threads sending ``requests`` requests in all; latencies and errors."""
    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    r = http.post("/v1/images/generations", json={"prompt": f"a red circle number {i % 7}", "seed": first_seed + i,
                                                                   "steps": steps})
                    ok = r.status_code == 200 and r.json()["data"][0]["b64_json"]
                    reason = None if ok else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    reason = f"{type(e).__name__}: {e}"
                with lock:
                    (errors.append(reason) if reason else latencies.append(time.perf_counter() - start))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {"clients": clients, "requests": requests, "errors": len(errors), "error_samples": errors[:3], "wall_s": round(wall, 2),
            "images_per_min": round(60 * len(latencies) / wall, 2), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(q[18], 3)}


MODES = {
    "single": "one server, the shared queue, --threads torch threads",
    "single-1t": "one server, 1 torch thread",
    "ray": "Ray Serve, --replicas replicas sharing --threads threads, batching on",
    "ray-nobatch": "Ray Serve as `ray`, batching off (max_batch_images=1)",
}


def open_server(mode: str, args):
    if mode == "single":
        return SingleServer(args.port, args.threads)
    if mode == "single-1t":
        return SingleServer(args.port, 1)
    if mode in ("ray", "ray-nobatch"):
        return RayServer(args.port, args.threads, args.replicas, batching=mode == "ray")
    raise SystemExit(f"unknown mode {mode!r}: one of {', '.join(MODES)}")


def load(args) -> dict:
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True),
                           "load_avg_at_start": os.getloadavg()}, "steps": args.steps, "threads": args.threads,
               "replicas": args.replicas, "modes": {m: MODES.get(m) for m in args.modes.split(",")}, "runs": []}
    for mode in args.modes.split(","):
        server = open_server(mode, args)
        try:
            drive(server.url, 2, 4, args.steps, first_seed=10_000)  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                run = drive(server.url, clients, max(args.min_requests, args.per_client * clients), args.steps)
                run.update(mode=mode, load_avg=os.getloadavg()[0])
                print(json.dumps(run), flush=True)
                results["runs"].append(run)
        finally:
            server.close()
    return results


def soak(args) -> dict:
    server = SingleServer(args.port, args.threads)
    try:
        pid = server.process.pid
        warm = drive(server.url, args.clients, args.warmup, args.steps, first_seed=50_000)
        after_warmup = rss_mb(pid)
        samples, done, errors, total_start = [], 0, 0, time.perf_counter()
        while done < args.requests:
            batch = min(50, args.requests - done)
            run = drive(server.url, args.clients, batch, args.steps, first_seed=done)
            done, errors = done + batch, errors + run["errors"]
            samples.append({"requests": done, "rss_mb": round(rss_mb(pid), 1), "p50_s": run["p50_s"]})
            print(json.dumps(samples[-1]), flush=True)
        end = rss_mb(pid)
        return {"requests": args.requests, "clients": args.clients, "steps": args.steps, "errors": errors + warm["errors"],
                "wall_s": round(time.perf_counter() - total_start, 1), "rss_after_warmup_mb": round(after_warmup, 1),
                "rss_end_mb": round(end, 1), "rss_change_pct": round(100 * (end - after_warmup) / after_warmup, 2), "samples": samples}
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("load", "soak", "server"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, default=8390)
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in all (default: every core)")
        p.add_argument("--out", type=Path)
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--clients", default="1,4,16" if name == "load" else "4")
    load_p, soak_p = sub.choices["load"], sub.choices["soak"]
    load_p.add_argument("--modes", default="single,ray", help="comma-separated: " + "; ".join(f"{k}: {v}" for k, v in MODES.items()))
    load_p.add_argument("--replicas", type=int, default=2)
    load_p.add_argument("--per-client", type=int, default=2, help="requests per client at each level")
    load_p.add_argument("--min-requests", type=int, default=8)
    soak_p.add_argument("--requests", type=int, default=300)
    soak_p.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    if args.command == "server":
        run_server(args.port, args.threads)
        return
    if args.command == "soak":
        args.clients = int(args.clients)
    result = load(args) if args.command == "load" else soak(args)
    result["command"] = " ".join(["benchmarks/serve_load.py"] + sys.argv[1:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
