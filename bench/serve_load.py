"""Bounded load test of the real retrieval service on loopback, side by side with the framework's
ceiling: a bare FastAPI endpoint, served by the same uvicorn settings, that parses the same
request body (one 1,000-float Wikipedia text query) and returns ten fixed hits. Same threaded
client, same clients; both servers up at once and measured in alternating rounds, so the
machine's slow spells hit both. Reports requests/s, p50/p99 latency (medians over rounds), errors,
the CPU time per request of the server process and of the client, and ``ratio_to_bare`` (service
req/s ÷ bare req/s of the same round, mean ± sd) in bench/results/serve_load.json; then
``/health``'s p50/p99 and errors alone and beside 300 slow-body clients (``slow_clients``). Where the
client's CPU per request is the larger, the client bounds both rates and the ratio says only
that the service keeps up with it; the servers' CPU per request says what each costs.

    python bench/serve_load.py [--rounds 5] [--seconds 8] [--clients 8] [--state runs/wikipedia/state]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, models_dir_from_state, start_service, wait_healthy, write_result  # noqa: E402
from report import load_table  # noqa: E402


def bare_app():
    """The ceiling: FastAPI, one POST that parses the JSON body into an array and answers fixed hits."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from pydantic_core import from_json

    app = FastAPI()
    hits = json.dumps({"model_version": "bare", "results": [{"image": [
        {"id": str(i), "distance": i, "stage": 0, "labels": ["art"]} for i in range(10)]}]}).encode()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/search")
    async def search(request: Request) -> Response:
        body = from_json(await request.body())  # the fastest JSON parser at hand (Rust)
        np.asarray(body["features"], dtype=np.float32)
        return Response(hits, media_type="application/json")

    return app


def serve_bare(port: int) -> None:
    from lifelong_hashing.config import load_params
    from lifelong_hashing.inference.service import run_server

    run_server(bare_app(), load_params(ROOT / "params.yaml").serving, "127.0.0.1", port)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, server_pid: int, queries: np.ndarray, seconds: float, clients: int, k: int) -> dict:
    """``clients`` threads posting one random query each, back to back, for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        with httpx.Client(base_url=url, timeout=30) as session:
            while time.perf_counter() < stop_at:
                body = {"modality": "text", "k": k, "features": [queries[rng.integers(len(queries))].tolist()]}
                start = time.perf_counter()
                try:
                    ok = session.post("/search", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies[i].append(time.perf_counter() - start)
                errors[i] += not ok

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began, server_began, client_began = time.perf_counter(), cpu_seconds(server_pid), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    server_cpu, client_cpu = cpu_seconds(server_pid) - server_began, time.process_time() - client_began
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1000
    return {"requests": int(lat.size), "requests_per_s": round(lat.size / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "server_cpu_us_per_request": round(server_cpu / lat.size * 1e6, 1),
            "client_cpu_us_per_request": round(client_cpu / lat.size * 1e6, 1), "errors": int(sum(errors))}


def health_latencies(url: str, seconds: float) -> dict:
    """/health polled for ``seconds`` by one client: p50/p99 (ms) and errors."""
    latencies, errors, end = [], 0, time.time() + seconds
    with httpx.Client(timeout=5) as client:
        while time.time() < end:
            start = time.perf_counter()
            try:
                ok = client.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - start) * 1000)
            errors += not ok
            time.sleep(0.02)
    return {"requests": len(latencies), "errors": errors, "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2)}


def slow_clients(url: str, connections: int, seconds: float) -> dict:
    """``/health`` alone, then beside ``connections`` clients that send POST headers declaring
    100 kB and then one body byte a second (slowloris on the body)."""
    import socket

    alone = health_latencies(url, seconds)
    host, port = url.removeprefix("http://").split(":")
    slow = []
    for _ in range(connections):
        conn = socket.create_connection((host, int(port)))
        conn.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{")
        slow.append(conn)
    stop = threading.Event()

    def trickle():
        while not stop.wait(1.0):
            for conn in slow:
                try:
                    conn.send(b" ")
                except OSError:
                    pass  # cut off by the server's request deadline

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        beside = health_latencies(url, seconds)
    finally:
        stop.set()
        for conn in slow:
            conn.close()
    return {"connections": connections, "seconds": seconds, "health_alone": alone, "health_beside_slow": beside}


def summary(runs: list[dict]) -> dict:
    """All rounds of one endpoint: their requests and errors summed, rates and latencies as medians."""
    return {"requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
            **{key: round(float(np.median([r[key] for r in runs])), 2)
               for key in ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request",
                           "client_cpu_us_per_request")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="per round and endpoint")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--slow-connections", type=int, default=300, help="slow-body clients beside /health")
    ap.add_argument("--state", type=Path, default=ROOT / "runs" / "wikipedia" / "state")
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare:
        return serve_bare(args.serve_bare)
    work = Path(tempfile.mkdtemp(prefix="lhash-load-"))
    models = models_dir_from_state(args.state, work / "models")
    data = np.load(ROOT / "data" / "wikipedia" / "wikipedia.npz")
    queries = data["text_tfidf"][data["split"] == "test"]
    port = free_port()
    with open(work / "bare.log", "w") as log:
        bare = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    service = None
    try:
        urls = {"bare": wait_healthy(bare, f"http://127.0.0.1:{port}", work / "bare.log")}
        service, urls["service"] = start_service(models, work / "serve.log")
        pids = {"bare": bare.pid, "service": service.pid}
        rounds = {"bare": [], "service": []}
        for _ in range(args.rounds):  # alternated, so a slow spell of the machine hits both
            for name in rounds:
                rounds[name].append(load(urls[name], pids[name], queries, args.seconds, args.clients, args.k))
        slow = slow_clients(urls["service"], args.slow_connections, args.seconds)
    finally:
        for proc in (bare, service):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    measured = {name: summary(runs) for name, runs in rounds.items()}
    ratios = [s["requests_per_s"] / b["requests_per_s"] for s, b in zip(rounds["service"], rounds["bare"], strict=True)]
    result = {"seconds": args.seconds, "rounds": args.rounds, "clients": args.clients, **measured,
              "ratio_to_bare": round(float(np.mean(ratios)), 3), "ratio_to_bare_sd": round(float(np.std(ratios)), 3),
              "ratio_per_round": [round(r, 3) for r in ratios],
              "database_size": database_size(models), "slow_clients": slow,
              "query": f"1 Wikipedia text query (1,000-d TF-IDF), top-{args.k}"}
    print(load_table(result))
    print(f"written to {write_result('serve_load', result)}")


def database_size(models: Path) -> int:
    from lifelong_hashing.engine.codestore import CodeStore
    from lifelong_hashing.inference.versions import current_dir

    return len(CodeStore.load(current_dir(models) / "codes.npz"))


if __name__ == "__main__":
    main()
