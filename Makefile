# trajlab: `make demo` sets up and runs the main job; `make test` sets up and runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.trajlab-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench train-micro train-world quality clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

# the shapes world's study (teacher vs every student, both ablations, hybrids, controls); WORLD=micro: the digit world's
WORLD ?= shapes
demo: $(STAMP)
	$(PY) -m trajlab demo --out runs/demo --world $(WORLD)

# two pytest workers (one a core on the 2-core CI), a test file to one worker (its module fixtures built once)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(PY) benchmarks/capture_overhead.py
	$(PY) benchmarks/jvp_cost.py
	$(PY) benchmarks/tap_overhead.py

train-micro: $(STAMP)
	$(PY) -m trajlab.models.micro.train --out data/micro

# the shapes world (trajlab/worlds/shapes): judge, VAE, CLIP, the shapes-sd teacher, its eight students; fixed seeds,
# one process per stage (1 CPU thread each), two at once; into WORLD_OUT (default: the shipped folder)
WORLD_OUT ?= data/worlds/shapes
train-world: $(STAMP)
	$(PY) -m trajlab.worlds.shapes.train --out $(WORLD_OUT) --jobs 2 --checkpoint runs/shapes-train/$(notdir $(WORLD_OUT))-teacher.ckpt

quality: $(STAMP)
	$(PY) -m trajlab.models.micro.quality

clean:
	rm -rf runs .pytest_cache
