# Two entry points for a fresh machine:
#   make run    set up .venv and fit PerturbedVAE on the shipped real Norman 2019 cells
#   make test   set up .venv and run the test suite (what CI runs, via .ci/run)
#   make test-fast   the suite without the tests marked slow (notebooks, subprocess fits,
#                    DDP, benchmark CLI): under 2 minutes on a 2-core CPU
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch (fast, already on disk here); on a machine with
# an NVIDIA GPU, install your CUDA torch into .venv first and it is kept.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup run test test-fast benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 || $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping/using the torch already present (GPU users: install CUDA torch first)"; \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(PY) -m pyro_pvae.fit --config norman

test: setup
	$(PY) -m pytest -q -x --durations=15

test-fast: setup
	$(PY) -m pytest -q -x --durations=10 -m "not slow"

# accuracy benchmark (model vs baselines on held-out perturbations); speed benchmarks: perf/
benchmark: setup
	$(PY) -m pyro_pvae.benchmark --config norman

clean:
	rm -rf $(VENV) runs outputs
