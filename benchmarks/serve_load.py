"""Load on `python -m flan_squad.serve`: N requests, C at a time, real SQuAD questions; throughput and latency.

    python -m benchmarks.serve_load                                  # 200 requests, 8 at a time, two servers:
    python -m benchmarks.serve_load --requests 40 --concurrency 4    # ... one per --server setting below
    python -m benchmarks.serve_load --url http://127.0.0.1:8000      # a server already running

By default it starts `python -m flan_squad.serve` itself once per `--server` setting (default: batching off,
`max_batch=1`, then on, the defaults), on a free local port, with `--model-args` (default: flan-t5-small's
architecture with RANDOM weights: its answers are nonsense and mostly run to max_new_tokens, so this measures cost,
never accuracy), sends the same requests to each, and stops it. Prints one table, writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flan_squad.data.squad import read_squad_file
from flan_squad.utils.config import PROJECT_ROOT

SHARED = Path(os.environ.get("FLAN_SQUAD_SHARED", PROJECT_ROOT.parent / "shared"))
DEV = SHARED / "data" / "squad" / "v1.1" / "dev-v1.1.json"
MODEL_ARGS = "model=flan_t5_small model.init=random dataset=squad_v1 precision=32-true"
SERVERS = ["max_batch=1", "max_batch=16 max_wait_ms=5"]


def post(url: str, body: dict, timeout: float = 600) -> tuple[int, float]:
    """One request: its HTTP status and its latency in seconds."""
    request = urllib.request.Request(f"{url}/answer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.perf_counter() - started


def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send `bodies` with `concurrency` requests in flight; throughput and latency percentiles."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda body: post(url, body), bodies))
    seconds = time.perf_counter() - started
    latencies = sorted(latency for status, latency in results if status == 200)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
    return {"requests": len(bodies), "concurrency": concurrency, "ok": len(latencies),
            "failed": len(bodies) - len(latencies), "seconds": round(seconds, 3),
            "requests_per_s": round(len(latencies) / seconds, 3), "p50_ms": round(1000 * cuts[49], 1),
            "p95_ms": round(1000 * cuts[94], 1), "max_ms": round(1000 * latencies[-1], 1) if latencies else None,
            "batches": health["batches"], "requests_per_batch": round(health["requests_answered"] /
                                                                      max(1, health["batches"]), 2)}


def requests_from_squad(n: int, path: Path = DEV) -> list[dict]:
    """The first `n` questions of a SQuAD file (repeated if it has fewer) as request bodies."""
    questions = read_squad_file(path)[1]
    return [{"id": q.id, "question": q.question, "context": q.context}
            for q in (questions[i % len(questions)] for i in range(n))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: list[str], log: Path, env: dict[str, str] | None = None):
    """Start `python -m flan_squad.serve <args>` on a free port (its output to `log`); returns (url, process) once
    /health answers."""
    port = _free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "flan_squad.serve", *args, f"port={port}"], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True, cwd=PROJECT_ROOT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 600
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5).read()
            return url, process
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.5)


def stop(process) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=120)


def table(rows: list[dict]) -> str:
    header = f"{'server':<28} {'ok':>5} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'per batch':>9}"
    lines = [header, "-" * len(header)]
    lines += [f"{r['server']:<28} {r['ok']:>5} {r['requests_per_s']:>7.2f} {r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} "
              f"{r['max_ms']:>8.0f} {r['requests_per_batch']:>9.2f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--url", help="a server already running (then --server and --model-args are not used)")
    p.add_argument("--model-args", default=MODEL_ARGS, help="what the server serves (default: %(default)s)")
    p.add_argument("--server", action="append", help=f"server settings, one server each (default: {SERVERS})")
    p.add_argument("--warmup", type=int, default=8, help="requests sent first and not counted")
    p.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    bodies = requests_from_squad(args.requests + args.warmup)
    warmup, bodies = bodies[:args.warmup], bodies[args.warmup:]
    rows = []
    for setting in ([None] if args.url else args.server or SERVERS):
        url, process = (args.url, None) if args.url else serve(
            [*args.model_args.split(), *setting.split()], Path(args.out).with_suffix(".server.log"))
        try:
            load(url, warmup, args.concurrency)
            before = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
            row = load(url, bodies, args.concurrency)
            row["batches"] -= before["batches"]
            row["requests_per_batch"] = round(row["ok"] / max(1, row["batches"]), 2)
            about = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
        finally:
            if process is not None:
                stop(process)
        rows.append({"server": setting or url, **row, "model": about["model"], "init": about["init"],
                     "note": about["note"], "precision": about["precision"], "device": about["device"]})
    print(f"{args.requests} requests ({DEV.name}), {args.concurrency} at a time, {rows[0]['model']}"
          + (f" -- {rows[0]['note']}" if rows[0]["note"] else ""))
    print(table(rows))
    result = {"rows": rows, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                        "load_average_at_end": os.getloadavg()},
              "command": " ".join(["python -m benchmarks.serve_load", *(argv if argv is not None else sys.argv[1:])])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
