"""What the comparison concludes beyond its metrics: cost per query, when fine-tuning pays for itself, and the
decision matrix.

The decision matrix is the one the RAG-vs-fine-tuning guides use (data freshness, attribution, latency, per-query
cost, set-up time, behaviour/format, forgetting), filled with this run's measurements; the "wins here" column
names the best measured system for that factor *on this corpus*, or says the factor was not measured, and flags a
lead that lies inside the winner's 95% interval. Break-even: fine-tuning's one-time training compute (training
tokens × 3, forward + backward, at the per-token price) against the tokens it saves per query compared with RAG's
longer prompts. Left out on purpose: GPU-hour prices and hosting costs, which depend on the user's provider (set
``--price-per-mtok`` instead), and rendering (``hybrid/report.py``).
"""

from __future__ import annotations

TRAIN_COST_FACTOR = 3  # a training token costs about three forward tokens (forward + backward pass)


def cost_per_query(s: dict, price: float) -> float | None:
    """USD per query for the tokens processed (prompt + generated) at ``price`` per million tokens."""
    if s.get("prompt_tokens") is None:
        return None
    return ((s["prompt_tokens"] or 0) + (s["new_tokens"] or 0)) * price / 1e6


def break_even(result: dict) -> dict | None:
    """Queries after which fine-tuning's training cost is repaid by its shorter prompts (vs RAG), or None."""
    sys_, setup, price = result["systems"], result["setup"], result["settings"]["price_per_mtok"]
    if not {"rag", "finetuned"} <= set(sys_) or not setup.get("finetuned", {}).get("train_tokens"):
        return None
    saving = cost_per_query(sys_["rag"], price) - cost_per_query(sys_["finetuned"], price)
    one_time = setup["finetuned"]["train_tokens"] * TRAIN_COST_FACTOR * price / 1e6
    return {"one_time_usd": one_time, "saving_per_query_usd": saving,
            "queries": round(one_time / saving) if saving > 0 else None, "price_per_mtok": price}


def decision_matrix(result: dict) -> list[dict]:
    """One row per factor: the measured value per system and which system wins on this corpus."""
    sys_, price = result["systems"], result["settings"]["price_per_mtok"]
    fresh = result.get("freshness", {}).get("systems", {})
    setup = result["setup"]
    forgetting = result.get("forgetting", {})

    def mean(s, k):
        v = sys_[s].get(k)
        return v["mean"] if isinstance(v, dict) else v

    setup_s = {s: setup["index"]["build_s"] if s == "rag" else (setup.get("finetuned", {}).get("train_s") if s ==
               "finetuned" else None) for s in sys_}
    if "finetuned+rag" in sys_:
        setup_s["finetuned+rag"] = (setup.get("finetuned", {}).get("train_s") or 0) + setup["index"]["build_s"]
    if "hybrid" in sys_ and setup.get("raft"):
        setup_s["hybrid"] = (setup["raft"].get("train_s") or 0) + setup["index"]["build_s"]
    factors = [("accuracy (contains)", {s: mean(s, "contains") for s in sys_}, max),
               ("hallucination rate", {s: mean(s, "hallucination_rate") for s in sys_}, min),
               ("data freshness (fresh answers after an edit)", {s: fresh.get(s, {}).get("fresh") for s in sys_}, max),
               ("attribution (citation accuracy)", {s: mean(s, "citation_accuracy") for s in sys_}, max),
               ("latency p50 ms (one query)", {s: sys_[s]["latency_ms"].get("total", {}).get("p50") for s in sys_},
                min),
               ("cost per query, USD", {s: cost_per_query(sys_[s], price) for s in sys_}, min),
               ("set-up time s (index build / training)", setup_s, min),
               ("behaviour: format consistency", {s: mean(s, "format_consistency") for s in sys_}, max),
               ("forgetting: general-probe change", {s: forgetting.get(s) for s in sys_}, max)]
    rows = []
    for name, values, best in factors:
        key = {"accuracy (contains)": "contains", "hallucination rate": "hallucination_rate",
               "attribution (citation accuracy)": "citation_accuracy",
               "behaviour: format consistency": "format_consistency"}.get(name)
        known = {s: v for s, v in values.items() if v is not None}
        if len(known) < 2:
            win = "not measured"
        else:
            top = best(known.values())
            leaders = [s for s, v in known.items() if v == top]
            win = leaders[0] if len(leaders) == 1 else "tie: " + ", ".join(leaders)
            ci = (sys_[win].get(key) or {}).get("ci") if key and len(leaders) == 1 else None
            rest = [v for s, v in known.items() if s != win]
            if ci and any(ci[0] <= v <= ci[1] for v in rest):  # a lead inside the bootstrap interval is noise
                win += " (others within its 95% interval)"
        rows.append({"factor": name, "values": values, "wins": win})
    return rows
