"""Repeat the training-dependent systems over training seeds (``compare --seeds N``) and say how much they vary.

One LoRA run is one draw: its random A matrices, eval slice and data order all come from the seed, and on a
small corpus a different seed can move accuracy by more than the gap between two systems. Seed 0 is the adapter
``make finetune`` / ``make hybrid`` trained; each further seed trains a copy into ``<adapter root>/seeds/<s>``
with that run's resolved ``TrainConfig`` and the *same saved dataset*, only ``seed`` changed — training varies,
the questions do not. A copy is re-used while its stamp (the dataset's fingerprint and the training config)
still matches, so a second ``compare --seeds 3`` trains nothing.

Reported per system and metric: mean, standard deviation, min and max over seeds, and in how many seeds the
difference from RAG was significant (its paired 95% interval excluded zero). Left out on purpose: re-drawing the
training data per seed (synthetic questions and paraphrases) — that would mix data noise into training noise.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import fields, replace
from pathlib import Path

from finetune.lora import adapter_dir
from finetune.rows import load_data
from finetune.train import TrainConfig, train

log = logging.getLogger(__name__)
SPREAD = ("contains", "f1", "citation_accuracy", "hallucination_rate", "faithfulness", "format_consistency",
          "abstain_precision", "abstain_recall")


def _stamp(cfg: dict, data: Path) -> dict:
    state = json.loads((data / "state.json").read_text()) if (data / "state.json").exists() else {}
    return {"data": state.get("_fingerprint"), "config": {k: v for k, v in cfg.items()
                                                          if k not in ("output_dir", "seed", "device")}}


def seeded(cfg, seed: int, kinds: set[str]):
    """A comparison config (``hybrid.systems.CompareConfig``) whose adapters of ``kinds`` ('finetuned', 'raft')
    are those of training ``seed``, trained first when missing."""
    return replace(cfg, finetuned=str(seed_adapter(cfg.finetuned, seed)) if "finetuned" in kinds else cfg.finetuned,
                   raft=str(seed_adapter(cfg.raft, seed)) if "raft" in kinds else cfg.raft)


def seed_adapter(root: str | Path, seed: int) -> Path:
    """The training output folder for ``seed`` (0: ``root`` itself), trained first when missing or stale."""
    root = Path(root)
    if seed == 0:
        return root
    data, out = root.parent / "data", root / "seeds" / str(seed)
    if not (root / "config.json").exists() or not data.is_dir():
        raise FileNotFoundError(f"--seeds: {root} has no config.json or {data} no saved dataset to re-train on; "
                                "train it with `make finetune` / `make hybrid` first")
    base = json.loads((root / "config.json").read_text())
    stamp = _stamp(base, data)
    try:
        if json.loads((out / "seed_of.json").read_text()) == stamp and (out / "metrics.json").exists():
            adapter_dir(out)
            return out
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    known = {f.name for f in fields(TrainConfig)}
    saved = {k: v for k, v in base.items() if k in known}
    # a config written before --lora-layers existed trained every block; today's default (-1) would halve it
    cfg = TrainConfig(**{"lora_layers": 0} | saved | {"output_dir": str(out), "seed": base["seed"] + seed})
    log.info("--seeds: training %s with seed %d (same data and config as %s)", out, cfg.seed, root)
    run = train(cfg, load_data(str(data)))
    del run
    (out / "seed_of.json").write_text(json.dumps(stamp, indent=1))
    return out


def summary(vals: list[float]) -> dict:
    """Mean, sd, min, max and the values of one metric over seeds (seed 0 first)."""
    return {"mean": round(statistics.fmean(vals), 4), "sd": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "per_seed": vals}


def spread(summaries: list[dict], diffs: list[dict]) -> dict:
    """Across seeds, per metric: mean, sd, min, max, the per-seed values; plus how many seeds' differences from
    the reference system were significant. ``summaries``/``diffs``: one ``summarise``/``differences`` entry a seed."""
    out = {"n": len(summaries)}
    for metric in SPREAD:
        vals = [s[metric]["mean"] if isinstance(s.get(metric), dict) else s.get(metric) for s in summaries]
        vals = [v for v in vals if v is not None]
        if vals:
            out[metric] = summary(vals)
    if diffs and all(diffs):
        out["significant_vs_ref"] = {m: sum(d[m]["significant"] for d in diffs) for m in diffs[0]}
        out["diff_vs_ref"] = {m: [d[m]["diff"] for d in diffs] for m in diffs[0]}
    return out
