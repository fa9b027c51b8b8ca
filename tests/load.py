"""Load test of the web page: N questions at once to `/api/ask` on a loopback port; p50/p95 and errors.

Starts the real `python -m hybrid ui` on the demo corpus with the tiny SmolLM2-135M reader (llama.cpp on a CPU),
waits for ``/api/status``, then N threads each ask one golden test question of the RAG system and read its
server-sent events to ``end``; an answer counts when it has a ``done`` event and no ``error``. Five seconds in,
one ``/api/status`` request measures how the page itself responds while questions queue. The page answers one
question at a time (a lock in ``hybrid/ui.py``), so the last of 50 waits for the 49 before it: latency here is
mostly queueing, and an answer may take up to an hour before it counts as an error. Run by `make fuzz`
(``tests/fuzz.py --load 50``); the first run builds the demo index (~1 min).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def _ask(base: str, question: str, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        status, body = _get(f"{base}/api/ask?" + urllib.parse.urlencode({"q": question, "systems": "rag"}), timeout)
        events = [line.removeprefix("event: ") for line in body.splitlines() if line.startswith("event: ")]
        ok = status == 200 and "done" in events and "error" not in events and events[-1:] == ["end"]
        why = "" if ok else f"HTTP {status}, events {events[-4:]}: {body[-200:]}"
    except (OSError, TimeoutError) as e:  # refused, reset, or no answer within the timeout
        ok, why = False, f"{type(e).__name__}: {e}"
    return {"ok": ok, "seconds": time.perf_counter() - t0, "why": why}


def _quantile(xs: list[float], q: float) -> float | None:
    return round(statistics.quantiles(xs, n=100, method="inclusive")[int(q * 100) - 1], 2) if len(xs) > 1 else None


def load_test(n: int = 50, port: int = 7871, docs: str = "data/demo", model: str = "smollm2-135m",
              start_timeout: float = 900, timeout: float = 3600) -> dict:
    """Serve the page, ask ``n`` questions at once, stop it; the numbers."""
    golden = [json.loads(line) for line in (REPO / docs / "golden.jsonl").read_text().splitlines() if line.strip()]
    questions = [q["question"] for q in golden if q.get("split", "test") == "test"]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([sys.executable, "-m", "hybrid", "ui", "--docs", docs, "--model", model, "--port",
                                   str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            t0 = time.perf_counter()
            while True:  # up once /api/status answers; a first run builds the index
                try:
                    if _get(f"{base}/api/status", 5)[0] == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.perf_counter() - t0 > start_timeout:
                    log.seek(0)
                    return {"n": n, "errors": n, "started": False, "log_tail": log.read()[-2000:].decode("replace")}
                time.sleep(1)
            startup = time.perf_counter() - t0
            results: list[dict] = [{} for _ in range(n)]

            def one(i: int) -> None:
                results[i] = _ask(base, questions[i % len(questions)], timeout)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            t1 = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(5)  # the questions are queued: how long does the page's status take now?
            s0 = time.perf_counter()
            status_ok = _get(f"{base}/api/status", timeout)[0] == 200
            status_s = time.perf_counter() - s0
            for t in threads:
                t.join()
            wall = time.perf_counter() - t1
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
    secs = sorted(r["seconds"] for r in results)
    errors = [r["why"] for r in results if not r["ok"]]
    return {"n": n, "system": "rag", "model": model, "docs": docs, "started": True,
            "startup_s": round(startup, 1), "wall_s": round(wall, 1), "answers_per_s": round(n / wall, 2),
            "p50_s": _quantile(secs, 0.50), "p95_s": _quantile(secs, 0.95), "max_s": round(secs[-1], 2),
            "errors": len(errors), "errors_seen": errors[:5],
            "status_under_load_s": round(status_s, 2), "status_under_load_ok": status_ok}


if __name__ == "__main__":
    print(json.dumps(load_test(int(sys.argv[1]) if len(sys.argv) > 1 else 50), indent=1))
