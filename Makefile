# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The versions we tested (jax, flax, grain, orbax, torch, ...): every install here is constrained by this file.
LOCK := constraints.txt
# CI runs on 2 cores; pytest-xdist splits the suite over them.
PYTEST_WORKERS ?= 2

.PHONY: venv test test-slow test-fast test-latest lock demo demo-pretrain demo-convert bench gpu-wheels clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned (test/convert only): an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests

# The suite against the newest releases pyproject.toml allows (no lock), in its own .venv-latest; if it passes,
# `make lock` records those versions as the new tested set.
test-latest:
	test -x .venv-latest/bin/python || $(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade -e '.[test]'
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -E '^(jax|jaxlib|flax|optax|orbax-checkpoint|grain|numpy|torch)=='
	HF_HUB_OFFLINE=1 .venv-latest/bin/python -m pytest -q -n $(PYTEST_WORKERS) tests

# Rewrite constraints.txt from .venv-latest (after a green `make test-latest`), else from .venv.
lock:
	@v=.venv-latest; test -x $$v/bin/python || v=$(VENV); \
	{ echo "# Tested versions: \`make test\` and \`make demo\` install from this file (pip -c), so a fresh machine gets"; \
	  echo "# what CI last passed with. Regenerate with \`make lock\` after a green \`make test-latest\`."; \
	  echo "# Python $$($$v/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m), $$(date -u +%Y-%m-%d)."; \
	  $$v/bin/python -m pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu/torch==\1/'; } > $(LOCK)

# The released vace-1.3B architecture (random bf16 weights, 4.3 GB, the official sharded folder) converted, trained 2
# steps and used to stylise a clip through the CLIs on CPU. Heavy (see README); never part of `make test`: the file
# is not named test_*.py, so only this target collects it.
test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -s tests/slow_vace_1_3b.py

# The main job on the embedded default (pickstyle_jax/demo/): load the demo's shipped base models (checksums
# verified), train the PickStyle LoRA on a held-out style, stylise held-out clips and print the results table
# (out/demo/).
demo: $(STAMP)
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $(BIN)/python -m pickstyle_jax.demo --workdir out/demo

# Refit the shipped base models from scratch (hours on 2 cores; resumable: rerun after an interruption) and replace
# pickstyle_jax/demo/weights with the result and a fresh checksum manifest.
demo-pretrain: $(STAMP)
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $(BIN)/python -m pickstyle_jax.demo.pretrain --config=configs/demo.py \
		--workdir=out/demo-pretrain
	HF_HUB_OFFLINE=1 $(BIN)/python -m pickstyle_jax.demo.shipped --workdir out/demo-pretrain

# The converter round trip on a tiny random diffusers VACE model, and the parity it reaches.
demo-convert: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m convert.demo

bench: $(STAMP)
	$(BIN)/python bench/dit_forward.py
	$(BIN)/python bench/vae.py
	$(BIN)/python bench/umt5.py
	$(BIN)/python bench/data.py

# Wheels for a GPU machine without network whose Python has only jax[cuda], flax, optax, orbax-checkpoint, numpy and
# torch (the image bench/gpu.sh targets). bench/gpu.sh does not need them (the GPU benchmarks import only what that
# image has); the trainer does: grain, ml-collections and their dependencies, for manylinux_2_28 x86_64 (and older
# manylinux tags) and each CPython in GPU_PYTHONS (jax 0.11 needs 3.12 or newer; the image's exact version is not
# known here), at the versions in $(LOCK) (`GPU_LOCK=` lets pip pick the newest instead). Needs a package index.
# Carry the folder over, then: pip install --no-index --find-links gpu-wheels grain ml-collections
GPU_WHEELS ?= gpu-wheels
GPU_PYTHONS ?= 3.12 3.13
GPU_PACKAGES ?= grain ml-collections
GPU_LOCK ?= -c $(LOCK)
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	for v in $(GPU_PYTHONS); do \
	  $(PY) -m pip download --dest $(GPU_WHEELS) --only-binary=:all: --platform manylinux_2_28_x86_64 \
	    --implementation cp --python-version $$v $(GPU_LOCK) $(GPU_PACKAGES) || exit 1; \
	done
	ls $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .venv-latest demo_out out .pytest_cache
