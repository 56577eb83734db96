# DeepDreamAnalysis: set-up and the commands of the README.
#   make demo    set everything up, then run the analysis of the bundled demo network
#   make test    set everything up, then run the test suite (what CI runs)
#   make bench   ratio benchmarks (benchmarks/README.md)
#   make train-demo   retrain the bundled demo network (minutes on 2 CPU cores)
#   make reproduce    the paper's experiments on real CT (docs/reproduction.md)
# Users with a GPU: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DATA := data/lits117
LITS_WHEEL := liver-ct-segmentation-package==1.6.0

.PHONY: setup demo test bench train-demo reproduce data clean

setup: $(STAMP) $(DATA)/img_117.mrc

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: a loose requirement can pull a multi-GB CUDA build
	$(PIP) install --quiet $(TORCH_SPEC)
	# pyradiomics 3.1.0 is a source release whose build needs numpy and versioneer beforehand
	$(PIP) install --quiet numpy versioneer setuptools wheel
	$(PIP) install --quiet --no-build-isolation "pyradiomics>=3.0"
	$(PIP) install --quiet -e ".[test,study]"
	touch $(STAMP)

# LiTS volume 117 (CC BY-NC-SA 4.0) ships in a PyPI package; fetched at set-up, never committed.
$(DATA)/img_117.mrc: | $(STAMP)
	mkdir -p $(DATA)/wheel
	$(PIP) download --quiet --no-deps --dest $(DATA)/wheel $(LITS_WHEEL)
	$(PY) -m zipfile -e $(DATA)/wheel/*.whl $(DATA)/wheel/x
	cp $(DATA)/wheel/x/liver_ct_segmentation_package/data/img_117.mrc $(DATA)/wheel/x/liver_ct_segmentation_package/data/lab_117.mrc $(DATA)/
	rm -rf $(DATA)/wheel

data: $(DATA)/img_117.mrc

demo: setup
	$(VENV)/bin/deepdream-analysis demo --out results/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_benchmarks.py --update-readme

train-demo: setup
	$(PY) scripts/train_demo.py

reproduce: setup
	$(PY) scripts/reproduce.py --out results/reproduce --workers $$(nproc)

clean:
	rm -rf $(VENV) results data
