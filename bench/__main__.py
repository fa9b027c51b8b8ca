"""``python -m bench``: run the benchmark sections, each in its own process, and write JSON + RESULTS.md.

    python -m bench                       # every section at full size (≤ 45 min on 2 free cores)
    python -m bench --smoke               # every section at tiny sizes (plumbing check, ≤ 2 min)
    python -m bench --sections scale,backends
    python -m bench --beir ~/beir/scifact # also retrieval quality on a BEIR-format folder
    python -m bench --report bench/results/2026-01-01-host.json   # re-render RESULTS.md from a JSON
    python -m bench --report bench/results                        # … from the newest full run of each section

Full runs write ``bench/results/<date>T<time>-<host>[-<sections>].json`` (never over an older one) and render
``bench/RESULTS.md`` with every section from the newest full-size run that measured it, so ``--sections`` re-runs
one section without dropping the others; smoke runs write ``…-smoke.json`` / ``…-smoke.md`` beside it and leave
RESULTS.md alone (tiny sizes are not results). Each render also draws the charts (bench/charts.py) beside its
markdown — ``RESULTS-scale.png``, ``-generation.png``, ``-training.png`` — and links them under their tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from bench.charts import write_charts
from bench.measure import cores, host, isolated, run_section
from bench.report import render

# section name -> (module, what it measures); run in this order
SECTIONS = {
    "quality": ("bench.quality", "fitz-gov retrieval quality per mode, contextual header on/off"),
    "governance": ("bench.governance", "fitz-gov governance suite (tier 0 + tier 1 sample), FitzGovEvaluator"),
    "scale": ("bench.scale", "index build rates, disk, RSS, query latency, incremental update at 1k/10k/100k"),
    "store": ("bench.store", "embedded index vs Milvus Lite at 100k/1M chunks: build, latency, recall, RSS, disk"),
    "backends": ("bench.backends", "rank-bm25 vs bm25s; FAISS exact vs HNSW vs IVF"),
    "generation": ("bench.generation", "generator prefill/decode tokens/s vs the bandwidth bound, variants"),
    "training": ("bench.training", "LoRA training tokens/s, s/step, FLOP ratio"),
    "ray_index": ("bench.ray_index", "indexing on Ray Data: chunks/s at 1 and 2 workers, a 10M-chunk sizing estimate"),
}
HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench")


def run_all(sections: list[str], smoke: bool, beir: str | None, tier1_per_category: int | None = None) -> dict:
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": smoke, "host": host(),
           "sections": {}}
    # smoke checks plumbing on 1 thread: on a busy 2-core machine, 2 torch threads stall each other badly
    common = {"smoke": True, "threads": 1} if smoke else {}
    jobs = [(name, SECTIONS[name][0], common) for name in sections]
    if tier1_per_category is not None:
        jobs = [(n, m, {**kw, "per_category": tier1_per_category} if n == "governance" else kw) for n, m, kw in jobs]
    if beir:
        jobs.append(("beir", "bench.quality", {**common, "beir": beir}))
    for name, module, kwargs in jobs:
        log.info("section %s: %s", name, SECTIONS.get(name, ("", "retrieval quality on " + str(beir)))[1])
        t0 = time.perf_counter()
        try:
            res, rss = isolated(run_section, module, **kwargs)
            res["peak_rss_mb"] = rss
        except Exception as e:  # noqa: BLE001 -- one failing section must not lose the others' results
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            log.error("section %s failed: %s", name, res["error"])
        res["wall_seconds"] = round(time.perf_counter() - t0, 1)
        out["sections"][name] = res
        log.info("section %s done in %.0f s", name, res["wall_seconds"])
    out["host"]["load_avg_after"] = host()["load_avg_1_5_15"]
    return out


def newest_sections(out_dir: Path) -> tuple[dict, list[Path]]:
    """The full-size results in ``out_dir`` merged, oldest first, so each section is the newest run's; the files
    that gave a section. Each section keeps its run's date and host (``run_date``, ``run_host``)."""
    merged, used = None, {}
    for path in sorted(out_dir.glob("*.json")):  # names start with the UTC date and time
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if res.get("smoke") or "sections" not in res:  # smoke runs and one-off extras are not results
            continue
        for s in res["sections"].values():
            s.setdefault("run_date", res["date"])
            s.setdefault("run_host", res["host"].get("host"))
        merged = res if merged is None else {**res, "sections": {**merged["sections"], **res["sections"]}}
        used.update({name: path for name in res["sections"]})
    return merged, sorted(set(used.values()))


def _shown(p: Path) -> str:
    """A results path as RESULTS.md names it: relative to the repository when inside it."""
    p = p.resolve()
    return str(p.relative_to(HERE.parent) if p.is_relative_to(HERE.parent) else p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="sections:\n" + "\n".join(f"  {k:11s} {v[1]}" for k, v in SECTIONS.items()))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks every section runs (≤ 2 min)")
    p.add_argument("--beir", help="also measure retrieval quality on this BEIR-format folder "
                   "(corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset (default: all)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON results")
    p.add_argument("--markdown", default=str(HERE / "RESULTS.md"), help="where full runs render the tables")
    p.add_argument("--report", help="only render --markdown (and its charts) from this results JSON, or from a "
                   "folder of them (each section from the newest full run that measured it)")
    p.add_argument("--tier1-per-category", type=int, metavar="N",
                   help="governance: score N tier 1 cases per category (default 30, 180 of 2,920 cases; 0 = all "
                        "2,920, about an hour more on 2 cores)")
    p.add_argument("--budget-minutes", type=float, default=45,
                   help="optional extras (the opt-in larger model's governance run) are skipped when they would "
                        "push the run past this")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.report:
        try:
            if Path(a.report).is_dir():
                res, files = newest_sections(Path(a.report))
                if res is None:
                    raise ValueError("no full-size results JSON in this folder")
                source = ", ".join(_shown(f) for f in files)
            else:
                res, source = json.loads(Path(a.report).read_text()), a.report
        except (OSError, ValueError) as e:
            print(f"error: --report {a.report}: {e}", file=sys.stderr)
            return 2
        Path(a.markdown).write_text(render(res, source=source, charts=write_charts(res, a.markdown)))
        print(f"wrote {a.markdown}")
        return 0
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"error: --sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if a.beir:
        from bench.quality import BeirError, load_beir

        try:
            load_beir(a.beir)  # fail in one line now, not after the other sections have run
        except BeirError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    log.info("bench: sections %s, smoke=%s, %d cores", ",".join(sections), a.smoke, cores())
    t0 = time.perf_counter()
    os.environ["OPENBOOK_BENCH_DEADLINE"] = str(time.time() + 60 * a.budget_minutes)  # read by the sections
    if a.tier1_per_category is not None and a.tier1_per_category < 0:
        print("error: --tier1-per-category must be 0 (all) or more", file=sys.stderr)
        return 2
    res = run_all(sections, a.smoke, a.beir, a.tier1_per_category)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = "" if sections == list(SECTIONS) else "-" + "+".join(sections)
    stem = (f"{time.strftime('%Y-%m-%dT%H%M%S', time.gmtime())}-{res['host']['host'] or 'host'}{partial}"
            + ("-smoke" if a.smoke else ""))  # to the second: two runs never share a file
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    if a.smoke:
        md, table, source = out_dir / f"{stem}.md", res, _shown(json_path)
    else:  # RESULTS.md keeps every section, each from the newest full-size run that measured it
        md, (table, files) = Path(a.markdown), newest_sections(out_dir)
        source = ", ".join(_shown(f) for f in files)
    md.write_text(render(table, source=source, charts=write_charts(table, md)))
    failed = [n for n, s in res["sections"].items() if "error" in s]
    print(f"wrote {json_path} and {md} in {res['total_seconds']:.0f} s" + (f"; FAILED: {', '.join(failed)}"
                                                                           if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
