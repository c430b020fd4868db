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

The same two endpoints are then loaded by ``wrk`` (compiled, one thread, Debian's ``wrk``
package), which costs a fraction of a Python client per request, so both servers run saturated:
requests/s, p50/p99 and the servers' CPU per request at the same connections, alternating
rounds, with the ratios service ÷ bare per round (``wrk`` in the result). ``--profile`` samples
the service with py-spy during one wrk round and writes where its time goes
(``profile`` in the result: the share of samples in each layer).

    python bench/serve_load.py [--rounds 5] [--seconds 8] [--clients 8] [--connections 16] [--profile]
"""

import argparse
import json
import os
import shutil
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

from lifelong_hashing.config import load_params  # noqa: E402


def bare_app():
    """The ceiling: FastAPI, one POST that parses the JSON body into an array and answers fixed hits."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from pydantic_core import from_json

    from lifelong_hashing.inference.service import freeze_startup_objects

    @asynccontextmanager
    async def lifespan(app):
        freeze_startup_objects()  # as the service does
        yield

    app = FastAPI(lifespan=lifespan)
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


WRK_SCRIPT = """
local bodies = {%s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/search", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests": %%d, "seconds": %%.6f, "p50_us": %%d, "p99_us": %%d, '
    .. '"errors": %%d, "status_errors": %%d}\\n', summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def tool_path(name: str) -> str | None:
    """A command on PATH or beside this Python (a virtual environment's bin/)."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def wrk_script(queries: np.ndarray, k: int, path: Path, count: int = 64) -> Path:
    """A wrk script that posts ``count`` different queries in turn (as the Python client's)."""
    bodies = [json.dumps({"modality": "text", "k": k, "features": [q.tolist()]}) for q in queries[:count]]
    path.write_text(WRK_SCRIPT % ", ".join(f"[=[{b}]=]" for b in bodies))  # long strings: JSON has ]]
    return path


def wrk_load(url: str, server_pid: int, script: Path, seconds: float, connections: int) -> dict:
    """One wrk run: its counts and latencies, and the server's CPU time per request."""
    before = cpu_seconds(server_pid)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script),
                          url + "/search"], capture_output=True, text=True, check=True).stdout
    server_cpu = cpu_seconds(server_pid) - before
    r = json.loads(next(line for line in out.splitlines() if line.startswith("WRK "))[4:])
    return {"requests": r["requests"], "requests_per_s": round(r["requests"] / r["seconds"], 1),
            "p50_ms": round(r["p50_us"] / 1000, 2), "p99_ms": round(r["p99_us"] / 1000, 2),
            "server_cpu_us_per_request": round(server_cpu / max(r["requests"], 1) * 1e6, 1),
            "errors": r["errors"] + r["status_errors"]}


def wrk_rounds(urls: dict, pids: dict, script: Path, rounds: int, seconds: float, connections: int) -> dict:
    """Alternating wrk rounds on both endpoints; medians, and service ÷ bare per round."""
    runs = {"bare": [], "service": []}
    for _ in range(rounds):
        for name in runs:
            runs[name].append(wrk_load(urls[name], pids[name], script, seconds, connections))
    pairs = list(zip(runs["service"], runs["bare"], strict=True))
    ratios = {key: [round(s[key] / b[key], 3) for s, b in pairs]
              for key in ("requests_per_s", "p99_ms", "server_cpu_us_per_request")}
    return {"connections": connections, "rounds": rounds, "seconds": seconds,
            **{name: summary(r, ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request"))
               for name, r in runs.items()},
            "ratios": {key: {"mean": round(float(np.mean(v)), 3), "sd": round(float(np.std(v)), 3), "per_round": v}
                       for key, v in ratios.items()}}


LAYERS = (  # a sample's layer: the first of these its innermost frame's file matches
    ("idle: threads waiting", ("threading.py",)),
    ("onnxruntime: the text encoder", ("onnxruntime",)), ("code store search", ("engine/codestore", "engine/kernels")),
    ("service: request reading and checks", ("inference/service", "inference/batching", "inference/retrieval",
                                              "inference/versions")),
    ("pydantic", ("pydantic",)), ("json", ("json/",)), ("numpy", ("numpy",)), ("logging", ("logging/",)),
    ("FastAPI / Starlette", ("fastapi", "starlette")), ("uvicorn / httptools", ("uvicorn", "httptools")),
    ("asyncio event loop", ("asyncio",)),
)
STEPS = (  # frames whose samples, callees included, say what a step of a request costs
    "QueryReader.parse", "RetrievalModel.encode", "RetrievalModel.search", "as_hits", "_json", "Logger.info",
    "QueryBatcher.submit", "QueryBatcher._run_inline", "Request.body", "solve_dependencies",
    "RequestResponseCycle.send",
)


def profile(url: str, pid: int, script: Path, seconds: float, connections: int, out_dir: Path) -> dict:
    """py-spy samples of the service during one wrk round: each layer's share of the samples
    (innermost frame; C code counts to the Python frame that called it) and each step's (its
    frame and all it calls). The raw samples stay in ``out_dir``."""
    raw = out_dir / "service.pyspy"
    spy = subprocess.Popen([tool_path("py-spy"), "record", "--pid", str(pid), "--duration", f"{seconds + 1:g}",
                            "--rate", "500", "--format", "raw", "--output", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # attached
    wrk_load(url, pid, script, seconds, connections)
    spy.wait(timeout=seconds + 60)
    layers, steps, total = dict.fromkeys([name for name, _ in LAYERS] + ["other"], 0), dict.fromkeys(STEPS, 0), 0
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        layers[next((name for name, keys in LAYERS if any(key in frames[-1] for key in keys)), "other")] += int(count)
        names = {frame.split(" (")[0] for frame in frames}
        for step in STEPS:
            steps[step] += int(count) * (step in names)
        total += int(count)
    return {"samples": total, "raw": str(raw),
            "layers": {name: round(c / total, 3) for name, c in sorted(layers.items(), key=lambda kv: -kv[1])},
            "steps": {name: round(c / total, 3) for name, c in steps.items()}}


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


def summary(runs: list[dict], keys=("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request",
                                     "client_cpu_us_per_request")) -> dict:
    """All rounds of one endpoint: their requests and errors summed, rates and latencies as medians."""
    return {"requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
            **{key: round(float(np.median([r[key] for r in runs])), 2) for key in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="per round and endpoint")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16, help="wrk's connections (one thread)")
    ap.add_argument("--profile", action="store_true", help="py-spy the service during one more wrk round")
    ap.add_argument("--slow-connections", type=int, default=300, help="slow-body clients beside /health")
    ap.add_argument("--state", type=Path, default=ROOT / "runs" / "wikipedia" / "state")
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare:
        return serve_bare(args.serve_bare)
    for tool in ("wrk",) + (("py-spy",) if args.profile else ()):
        if tool_path(tool) is None:
            sys.exit(f"{tool} is not installed: `make bench-tools`" if tool == "wrk" else
                     f"{tool} is not installed: `pip install -e .[dev]`")
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
        script = wrk_script(queries, args.k, work / "search.lua")
        with_wrk = wrk_rounds(urls, pids, script, args.rounds, args.seconds, args.connections)
        spied = profile(urls["service"], service.pid, script, args.seconds, args.connections, work) \
            if args.profile else None
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
              "database_size": database_size(models), "slow_clients": slow, "wrk": with_wrk,
              "work": work_per_request(models, queries, args.k, load_params(ROOT / "params.yaml").serving.inline_rows),
              **({"profile": spied} if spied else {}),
              "query": f"1 Wikipedia text query (1,000-d TF-IDF), top-{args.k}"}
    print(load_table(result))
    print(f"written to {write_result('serve_load', result)}")


def work_per_request(models: Path, queries: np.ndarray, k: int, batch: int) -> dict:
    """The service's own work for one request, measured alone in this process: encoding and
    searching a query in a batch of ``batch`` (as the service batches requests under load, up to
    ``serving.inline_rows``), and rendering its hits as JSON; microseconds, medians of 200 runs.
    What a request costs beyond this and the bare endpoint is the service's overhead."""
    from lifelong_hashing.inference.retrieval import RetrievalModel
    from lifelong_hashing.inference.versions import current_dir

    model = RetrievalModel(current_dir(models), load_params(ROOT / "params.yaml").serving.encoder_threads)
    x = np.ascontiguousarray(queries[:batch], dtype=np.float32)

    def median_us(fn, per: int) -> float:
        fn()
        runs = []
        for _ in range(200):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return round(float(np.median(runs)) / per * 1e6, 1)

    results = model.search("text", x, k, None, ("image",))
    return {"batch": batch, "encode_us": median_us(lambda: model.encode("text", x), batch),
            "encode_search_hits_us": median_us(lambda: model.search("text", x, k, None, ("image",)), batch),
            "render_us": median_us(lambda: json.dumps({"results": results[:1]}).encode(), 1)}


def database_size(models: Path) -> int:
    from lifelong_hashing.engine.codestore import CodeStore
    from lifelong_hashing.inference.versions import current_dir

    return len(CodeStore.load(current_dir(models) / "codes.npz"))


if __name__ == "__main__":
    main()
