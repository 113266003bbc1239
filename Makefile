# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CI runs on 2 cores; pytest-xdist splits the suite over them.
PYTEST_WORKERS ?= 2

.PHONY: venv test test-slow test-fast demo demo-convert bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned (test/convert only): an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests

# The released vace-1.3B architecture (random bf16 weights, 4.3 GB, the official sharded folder) converted, trained 2
# steps and used to stylise a clip through the CLIs on CPU. Heavy (see README); never part of `make test`: the file
# is not named test_*.py, so only this target collects it.
test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -s tests/slow_vace_1_3b.py

# The main job on the embedded default: fit the demo's tiny base models, train the PickStyle LoRA on a held-out
# style, stylise held-out clips and print the results table (out/demo/).
demo: $(STAMP)
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $(BIN)/python -m pickstyle_jax.demo --workdir out/demo

# The converter round trip on a tiny random diffusers VACE model, and the parity it reaches.
demo-convert: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m convert.demo

bench: $(STAMP)
	$(BIN)/python bench/dit_forward.py
	$(BIN)/python bench/vae.py
	$(BIN)/python bench/umt5.py
	$(BIN)/python bench/data.py

clean:
	rm -rf $(VENV) demo_out out .pytest_cache
