"""The RAG pipeline: one config, then index → retrieve (bm25 | dense | hybrid | hybrid+rerank) → gate → answer.

Retrieval follows "fetch wide, fuse, re-rank, cut": each retriever returns max(k × fetch_factor, rerank_n)
results (only from the chunks ``--where`` allows, rag/filters.py: filtering before fusion keeps k), reciprocal
rank fusion merges them, the cross-encoder scores the fused top ``rerank_n`` and its order joins the BM25 and
dense lists in a second fusion, and the best ``k`` distinct passages go to the generator.
With hierarchical chunks a child hit is expanded to its parent section and parents are de-duplicated; a passage of
an older version of a document gives its place to its retrieved twin in the newer one (rag/versions.py). Before
generating, the abstention rule (rag/abstain.py: the retrieval scores and the reader's judgement against
thresholds calibrated by rag/evaluate.py) may answer "I don't know"; the generator can still abstain by itself.
Left out: the index (rag/index.py), the scoring models (rag/rerank.py, the generator backends), the types it
hands back (rag/ranking.py) and evaluation, which also makes the choices ``--mode auto`` and ``--abstain
calibrated`` read (rag/choose.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from rag import calibration
from rag.abstain import OBJECTIVES, SIGNALS, UNCALIBRATED, Rule, below, confidence, parse_rule
from rag.backend_openai import is_served, parse_served
from rag.chunk import STRATEGIES, ChunkConfig
from rag.config import artefacts, option
from rag.dense import KINDS
from rag.filters import HELP as WHERE_HELP
from rag.filters import allowed, parse_where
from rag.fuse import rrf
from rag.generate import IDK, Generator, JudgeUnavailable, citations, is_abstention, prompt_id
from rag.index import Index, UpdateStats
from rag.models import DEFAULT_EMBEDDER, DEFAULT_READER, DEFAULT_RERANKER, GENERATORS, check_name
from rag.ranking import AUTO, DEFAULT_MODE, MODES, Answer, Gate, Hit, Ranking, sources
from rag.runtime import BACKENDS, load_generator
from rag.store import STORES, Store, check_store, update_store
from rag.versions import CHOICES as VERSIONS
from rag.versions import HELP as VERSIONS_HELP
from rag.versions import Twins

log = logging.getLogger(__name__)


@dataclass
class RagConfig:
    """Every knob of the RAG pipeline; the CLI makes one ``--flag`` per field."""

    docs: str = option("data/demo", "folder of .md/.txt/.html/.pdf documents")
    index_dir: str = option("", "where the index lives (default .openbook/index/<folder name>)")
    store: str = option("embedded", f"index store: {', '.join(STORES)} (rag/store.py: BM25 + dense in Milvus, Milvus "
                        "Lite in --index-dir unless --store-url is given)")
    store_url: str = option("", "address of a Milvus server or cluster for --store milvus, e.g. "
                            "http://localhost:19530 (token: MILVUS_TOKEN); '' = Milvus Lite, embedded")
    hard_links: bool = option(False, "also index files with hard links the --docs walk did not find (other names "
                                     "may be outside --docs); off: skipped with a warning")
    mode: str = option(AUTO, f"retrieval mode: {', '.join(MODES)}, or 'auto': the one with the best recall@k on the "
                       f"folder's golden train split (chosen by `rag eval`), else {DEFAULT_MODE}")
    k: int = option(3, "passages given to the generator")
    where: list[str] = option((), WHERE_HELP)
    chunker: str = option("semantic", f"chunking strategy: {', '.join(STRATEGIES)}")
    chunk_size: int = option(120, "words per chunk (child chunk for hierarchical)")
    overlap: int = option(20, "words shared by neighbouring fixed/child chunks")
    parent_size: int = option(400, "words per parent section (hierarchical)")
    contextual: bool = option(True, "prepend 'title › section' to each chunk before indexing")
    versions: str = option("newest", VERSIONS_HELP)
    tables: str = option("grid", "how tables are indexed and shown: 'grid' (pipe tables) or 'rows' (each row one "
                         "line naming its column headers, so a row in a chunk apart from the header keeps its meaning)")
    embedder: str = option(DEFAULT_EMBEDDER, "sentence-transformers model: 'minilm' (packaged), a path or a hub id")
    faiss: str = option("exact", f"FAISS index kind: {', '.join(KINDS)}")
    fetch_factor: int = option(4, "each retriever returns k × this many results before fusion")
    rrf_k: int = option(60, "reciprocal rank fusion constant")
    rerank_n: int = option(30, "fused candidates the cross-encoder re-orders")
    reranker: str = option(DEFAULT_RERANKER, "cross-encoder: the trained default, a path or a hub id")
    rerank_precision: str = option("auto", "cross-encoder precision: 'auto' (bf16 on CPUs with native bf16 "
                                   "instructions such as AMX, else fp32), 'fp32' or 'bf16'")
    rerank_fusion: str = option("rrf", "'replace' the fused order by the re-ranker's, or 'rrf': fuse the re-ranker's "
                            "order with the BM25 and dense lists")
    model: str = option(DEFAULT_READER, f"generator: {', '.join(GENERATORS)}, a .gguf file, an HF folder, a hub id "
                        "or openai:MODEL@URL (an OpenAI-compatible chat server)")
    backend: str = option("auto", "generation runtime: 'auto' (llama.cpp for GGUF models on a CPU, else "
                          "transformers), 'llamacpp' or 'transformers'")
    adapter: str = option("", "LoRA adapter folder for the generator, e.g. a RAFT adapter from `python -m hybrid "
                          "train`, or with an openai: model the name the server serves it under ('' = the plain "
                          "model)")
    max_new_tokens: int = option(48, "generated tokens per answer at most")
    abstain: str = option("calibrated", "when to say I don't know without generating: 'calibrated' (the rule "
                          "chosen on the golden train split; without one, judge<0: the reader judges the sources do "
                          "not state the answer), 'none', or SIGNAL<THRESHOLD[,SIGNAL<THRESHOLD] "
                          f"(any one below its threshold abstains; signals: {', '.join(SIGNALS)}), e.g. 'judge<0'")
    calibrate_for: str = option("accuracy", "what --abstain calibrated maximises on the golden train split: "
                                "'accuracy' (fewest wrong gate decisions: a refused answerable question and an "
                                "answered unanswerable one count alike) or 'f1' (F1 of refusing the unanswerable "
                                "ones: more refusals, of answerable questions too)")

    def __post_init__(self):
        if not self.docs.strip():  # Path("") is the current folder
            raise ValueError("--docs is empty; pass a folder of documents, e.g. --docs data/demo")
        if self.mode not in (*MODES, AUTO):
            raise ValueError(f"--mode must be one of {', '.join(MODES)} or {AUTO}, not '{self.mode}'")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, not '{self.backend}'")
        if self.abstain not in ("calibrated", "none"):
            parse_rule(self.abstain)  # names the flag when malformed
        self.where = [self.where] if isinstance(self.where, str) else list(self.where or [])
        parse_where(self.where)  # a malformed clause raises an error that names --where
        check_store(self.store, self.store_url)
        if self.rerank_precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--rerank-precision must be auto, fp32 or bf16, not '{self.rerank_precision}'")
        if self.calibrate_for not in OBJECTIVES:
            raise ValueError(f"--calibrate-for must be {' or '.join(OBJECTIVES)}, not '{self.calibrate_for}'")
        if self.versions not in VERSIONS:
            raise ValueError(f"--versions must be {' or '.join(VERSIONS)}, not '{self.versions}'")
        if self.rerank_fusion not in ("replace", "rrf"):
            raise ValueError(f"--rerank-fusion must be 'replace' or 'rrf', not '{self.rerank_fusion}'")
        for name in ("k", "fetch_factor", "rrf_k", "rerank_n", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not is_served(self.model):  # openai:MODEL@URL is checked below
            check_name("--model", self.model, GENERATORS)
        check_name("--embedder", self.embedder, [DEFAULT_EMBEDDER])
        check_name("--reranker", self.reranker, [DEFAULT_RERANKER])
        local = Path(self.adapter).expanduser()
        if is_served(self.model):  # a chat server: --adapter is the name it serves a LoRA under, not a folder
            parse_served(self.model)
            if self.backend != "auto":
                raise ValueError(f"--backend {self.backend}: --model {self.model} runs on its server; leave it auto")
            if self.adapter and (self.adapter.startswith((".", "/", "~")) or (local / "adapter_config.json").exists()):
                raise ValueError(f"--adapter {self.adapter}: with --model {self.model} pass the name the server "
                                 "serves the adapter under (vLLM: --lora-modules NAME=FOLDER), not a folder")
        elif self.adapter and (local.exists() or self.adapter.startswith((".", "/", "~"))) \
                and not (local / "adapter_config.json").exists():
            raise ValueError(f"--adapter {self.adapter}: no LoRA adapter there (adapter_config.json missing); "
                             "train one first, e.g. `make hybrid`")
        if not self.index_dir:
            self.index_dir = str(artefacts("index", self.docs))
        if Path(self.index_dir).exists() and not Path(self.index_dir).is_dir():
            raise ValueError(f"--index-dir {self.index_dir} is a file; pass a folder (created when missing)")
        self.chunk_config()  # validates chunker flags

    def chunk_config(self) -> ChunkConfig:
        return ChunkConfig(self.chunker, self.chunk_size, self.overlap, self.parent_size, self.contextual, self.tables)


class RagPipeline:
    """Loads models lazily, so retrieval-only work (eval of modes, the index) never loads the generator."""

    def __init__(self, cfg: RagConfig, index: Index | Store | None = None, judge_by: RagPipeline | None = None):
        self.cfg, self.index = cfg, index
        self._generator: Generator | None = None
        self._judge_by = judge_by  # an adapter's pipeline: the base model's, whose generator judges (loaded lazily)
        self._reranker = None
        self._mode: str | None = None
        self._can_judge = True  # False once the runtime said it has no log-probabilities (JudgeUnavailable)
        self._warned_objective = False

    def update_index(self, progress: bool = True) -> UpdateStats:
        c = self.cfg
        self.index, stats = update_store(c, progress)  # rag/store.py: the embedded index or an engine
        return stats

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = load_generator(self.cfg.model, self.cfg.max_new_tokens, adapter=self.cfg.adapter or None,
                                             backend=self.cfg.backend)
        return self._generator

    @property
    def reranker(self):
        if self._reranker is None:
            from rag.rerank import load_reranker

            self._reranker = load_reranker(self.cfg.reranker, precision=self.cfg.rerank_precision)
        return self._reranker

    @property
    def _variant(self) -> str:
        # a choice made with the defaults keeps the key it had before --tables and --versions (grid tables; with
        # newest versions only a folder marking a document superseded ranks differently); other settings are apart
        c = self.cfg
        return "".join(f"{name}={value}|" for name, value, default in
                       (("tables", c.tables, "grid"), ("versions", c.versions, "newest")) if value != default)

    def mode_key(self) -> str:
        """What a chosen mode depends on: the retrieval settings other than the mode."""
        c = self.cfg
        return f"mode|{c.embedder}|{c.reranker}|{c.chunker}|{c.contextual}|{self._variant}k={c.k}"

    @property
    def mode(self) -> str:
        """The retrieval mode in use: ``--mode``; for 'auto' the one chosen on the golden train split, if any."""
        if self.cfg.mode != AUTO:
            return self.cfg.mode
        if self._mode is None:
            entry = calibration.load(self.cfg.index_dir).get(self.mode_key(), {})
            self._mode = entry.get("mode") if entry.get("mode") in MODES else DEFAULT_MODE
        return self._mode

    def forget_mode(self) -> None:
        """Read the chosen mode again (after ``rag.choose.choose_mode`` saved a new choice)."""
        self._mode = None

    def rule(self) -> Rule | None:
        """When to abstain before generating: the ``--abstain`` rule, else the calibration saved beside the index, else
        ``rag.abstain.UNCALIBRATED`` (the reader's own judgement: a folder without a golden train split)."""
        c = self.cfg
        if c.abstain == "none":
            return None
        if c.abstain != "calibrated":
            return parse_rule(c.abstain)
        entry = calibration.load(c.index_dir).get(self.calibration_key())
        if entry and "rule" in entry:
            if entry.get("objective", "f1") == c.calibrate_for:
                return [tuple(x) for x in entry["rule"]]
            if not self._warned_objective:
                self._warned_objective = True
                log.warning("the abstention rule beside %s was calibrated for %s, not --calibrate-for %s: the "
                            "reader's own judgement (judge<0) gates until `rag eval` calibrates again",
                            c.index_dir, entry.get("objective", "f1"), c.calibrate_for)
        return list(UNCALIBRATED) if self._can_judge else None

    def calibration_key(self) -> str:
        """What a calibrated rule depends on: retrieval settings, the re-ranker's weights, and the reader whose
        judgement it may use (an adapter's pipeline shares its base model's rule: the comparison gates every
        system alike)."""
        c = self.cfg
        if MODES[self.mode].rerank:  # bf16 scores differ from fp32 ones by up to 0.02: a threshold holds for one
            from rag.rerank import rerank_precision, reranker_stamp

            scorer = f"{c.reranker}@{reranker_stamp(c.reranker)}:{rerank_precision(c.rerank_precision)}"
        else:
            scorer = c.embedder
        from rag.gguf_q8 import model_variant  # a Q8_0 copy judges a little differently from its file

        weights = model_variant(c.model)
        reader = f"{c.model}@{weights}" if weights else c.model
        return f"{self.mode}|{scorer}|{c.chunker}|{c.contextual}|{self._variant}k={c.k}|{reader}|prompt={prompt_id()}"

    @property
    def judge_generator(self) -> Generator:
        """The model whose yes/no judgement gates answers: the base model, also when an adapter generates. The rule
        an adapter shares (``calibration_key``) was fitted to the base model's judgement, and a LoRA moves the
        log-odds: judged by their own adapters, the 1.5B's closed-book and RAFT adapters fell below the base's
        threshold on almost every demo test question (contains 0.03 and 0.00 in `make compare`, 2026-12-03)."""
        if not self.cfg.adapter:
            return self.generator
        if self._judge_by is None:
            self._judge_by = RagPipeline(replace(self.cfg, adapter=""), index=self.index)
        return self._judge_by.generator

    def judge(self, question: str, hits: list[Hit]) -> float:
        """The reader's log-odds that these passages state the answer (the ``judge`` abstention signal)."""
        return self.judge_generator.judge(question, sources(hits))

    def ranked(self, query: str, mode: str | None = None, k: int | None = None, trace: dict | None = None
               ) -> Ranking:
        """Best-first distinct passages, seconds spent per stage, and the abstention signals (``SIGNALS``).
        ``trace``: a dict that receives each stage's best-first ``[(chunk_id, score)]`` list (bm25, dense, fused,
        rerank, final) for inspection."""
        c, mode, k = self.cfg, mode or self.mode, k or self.cfg.k
        use = MODES[mode]
        n = max(c.k * c.fetch_factor, c.rerank_n)  # the configured k: a longer cut sees the same candidates
        t0 = time.perf_counter()
        named = {}  # retriever name → its best-first [(chunk_id, score)]
        allow = allowed(self.index, c.where)  # --where, applied inside each retriever: before fusion, k stays k
        if use.bm25:
            named["bm25"] = self.index.search_bm25(query, n, allow)
        if use.dense:
            named["dense"] = self.index.search_dense(query, n, allow)
        signals = {name: found[0][1] for name, found in named.items() if found}  # best score of each
        lists = list(named.values())
        fused = lists[0] if len(lists) == 1 else rrf(lists, c.rrf_k)
        timings = {"retrieve": time.perf_counter() - t0}
        if trace is not None:
            trace |= named | {"fused": fused}
        ce: dict[str, float] = {}
        if use.rerank:
            from rag.rerank import rerank

            model = self.reranker  # loaded on first use, outside the timer: a load is not re-ranking latency
            t1 = time.perf_counter()
            pool = fused[: c.rerank_n]
            scored = rerank(model, query, [(cid, self.index.chunks[cid].index_text) for cid, _ in pool])
            ce = dict(scored)
            # as a third RRF list the re-ranker gained +0.017 nDCG@10 on the fitz-gov test split (rag/train_reranker.py)
            fused = scored if c.rerank_fusion == "replace" else rrf([*lists, scored], c.rrf_k)
            timings["rerank"] = time.perf_counter() - t1
            if trace is not None:
                trace["rerank"] = scored
        if trace is not None:
            trace["final"] = fused
        pool, seen = [], set()  # distinct passages, best first: (chunk id, score, chunk, what the generator sees)
        for cid, score in fused:
            chunk = self.index.chunks[cid]
            shown = self.index.chunks[chunk.parent_id] if chunk.parent_id else chunk
            if shown.id not in seen:
                seen.add(shown.id)
                pool.append((cid, score, chunk, shown))
        twins = Twins([(chunk.doc_id, shown.text, chunk.meta) for _, _, chunk, shown in pool])
        hits, used = [], set()
        for i in range(len(pool)):
            # an older version's passage gives its place to its newer twin (rag/versions.py)
            while c.versions == "newest" and (j := twins.newer_twin(i)) is not None:
                if trace is not None:
                    trace.setdefault("replaced", []).append((pool[i][0], pool[j][0]))
                i = j
            if i in used:
                continue
            used.add(i)
            cid, score, chunk, shown = pool[i]
            hits.append(Hit(cid, chunk.doc_id, chunk.section, shown.text, score, ce.get(cid), chunk.meta))
            if len(hits) == k:
                break
        if ce:
            signals["rerank"] = max(ce.values())
        return Ranking(hits, timings, signals)

    def _gate(self, question: str, ranked: Ranking, rule: Rule | None, defer_judge: bool = False) -> Gate:
        """Passages, timings and signals for a question; an abstaining Answer when a signal of ``rule`` (read once
        per call of answer or answer_batch) is below its threshold. The reader's judgement is asked only when the
        rule uses it, and only once the retrieval signals have passed; ``defer_judge``: not asked here (the
        caller asks it with the answer, ``Generator.judge_answer_batch``), only the retrieval signals gate."""
        hits, timings, signals = ranked
        hits, timings, signals = hits[: self.cfg.k], dict(timings), dict(signals)
        asked = [(n, t) for n, t in rule or [] if n != "judge"] if defer_judge and "judge" not in signals else rule
        try:
            failed = not hits or below(asked, signals, timings, judge=lambda: self.judge(question, hits))
        except JudgeUnavailable as e:
            if rule != UNCALIBRATED or self.cfg.abstain != "calibrated":
                raise  # a rule the user or the calibration chose needs the judgement
            log.warning("%s; without a calibrated rule openbook answers every question", e)
            self._can_judge, failed = False, not hits
        if failed:
            return Gate(hits, timings, signals, self._refused(question, hits, timings, signals, rule))
        return Gate(hits, timings, signals, None)

    @staticmethod
    def _refused(question: str, hits: list[Hit], timings: dict, signals: dict, rule: Rule | None) -> Answer:
        timings["generate"] = 0.0
        return Answer(question, IDK, True, "low-confidence", hits, [], False, confidence(rule, signals), timings,
                      signals)

    @staticmethod
    def _finish(question: str, hits: list[Hit], timings: dict, signals: dict, rule: Rule | None, gen) -> Answer:
        timings["generate"] = gen.seconds
        abstained = is_abstention(gen.text)
        cites = citations(gen.text, len(hits))
        cited = [] if abstained else [hits[i - 1] for i in cites] or hits[:1]
        return Answer(question, gen.text, abstained, "model" if abstained else "", hits, cited, bool(cites),
                      confidence(rule, signals), timings, signals, gen.prompt_tokens, gen.new_tokens)

    def answer(self, question: str, on_token=None, ranked: Ranking | None = None) -> Answer:
        """Retrieve (or take ``ranked``, a ``ranked()`` result for this question and mode), gate, then generate."""
        rule = self.rule()
        hits, timings, signals, early = self._gate(question, ranked or self.ranked(question), rule)
        if early:
            if on_token:
                on_token(IDK)
            return early
        gen = self.generator.answer(question, sources(hits), on_token=on_token)
        return self._finish(question, hits, timings, signals, rule, gen)

    def answer_batch(self, questions: list[str], rankeds: list[Ranking], batch_size: int = 8,
                     desc: str = "") -> list[Answer]:
        """``answer`` for many questions with their ``ranked()`` results.

        On transformers the answers generate in padded batches: faster, not by much, for RAG prompts on a 2-core
        CPU, where reading ~460 prompt tokens dominates (81 demo answers took 1.4 s each in batches of 8, against
        a p50 of 2.1-2.7 s one at a time); each answer's generate time is then its batch's time divided by the
        batch size, which is throughput, not the latency one user would see. On llama.cpp a model that judges its
        own passages judges up to 16 questions together and answers those that pass in the same sequences
        (``judge_answer_batch``: the answer turn re-uses the judgement's prompt); an adapter (judged by the base
        model) and a model gated by a rule without the judgement answer in ``chat_batch``'s groups, which read the
        prompts' common start once and decode together.
        """
        rule = self.rule()
        backend = self.generator.backend
        if backend not in ("transformers", "llamacpp"):  # a served model: one request at a time
            return [self.answer(q, ranked=r) for q, r in tqdm(list(zip(questions, rankeds, strict=True)),
                                                               desc=desc, disable=not desc)]
        # on llama.cpp a model that judges its own passages judges and answers in one pass (an adapter is judged
        # by the base model, a rule without the judgement asks none: those judge here, if at all, and answer below)
        own = backend == "llamacpp" and not self.cfg.adapter and any(n == "judge" for n, _ in rule or [])
        gated = [self._gate(q, r, rule, defer_judge=own) for q, r in zip(questions, rankeds, strict=True)]
        out = [g.early for g in gated]
        later = [i for i, g in enumerate(gated) if g.early is None and own and "judge" not in g.signals]
        if later:
            def passes(j: int, odds: float) -> bool:
                return not below(rule, gated[later[j]].signals | {"judge": odds}, {}, judge=lambda: odds)

            asks = [(questions[i], sources(gated[i].hits)) for i in later]
            for i, (odds, seconds, gen) in zip(later, self.generator.judge_answer_batch(asks, passes, desc=desc),
                                               strict=True):
                g = gated[i]
                g.signals["judge"], g.timings["judge"] = odds, seconds
                out[i] = (self._finish(questions[i], g.hits, g.timings, g.signals, rule, gen) if gen else
                          self._refused(questions[i], g.hits, g.timings, g.signals, rule))
        todo = [i for i, g in enumerate(gated) if g.early is None and i not in later]
        gens = self.generator.answer_batch([(questions[i], sources(gated[i].hits)) for i in todo],
                                           batch_size=batch_size, desc=desc) if todo else []
        for i, gen in zip(todo, gens, strict=True):
            g = gated[i]
            out[i] = self._finish(questions[i], g.hits, g.timings, g.signals, rule, gen)
        return out
