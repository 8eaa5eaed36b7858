# The two commands: `make app` and `make test`. Both create and reuse .venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST  := $(BIN)/python -m pytest
DEMO    := demo/run

.PHONY: app test test-slow test-browser test-all install demo-run demo-cifar2 bench bench-gallery bench-first-gallery ship-factors lds-demo lds-cifar2 clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Start the app on the shipped demo run, bound to 127.0.0.1.
app: $(STAMP)
	$(BIN)/streamlit run app.py --server.address 127.0.0.1 --server.headless true --browser.gatherUsageStats false

## Default test tier (fast; no slow or browser tests).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTEST) -q

test-slow: $(STAMP)
	$(PYTEST) -q -m slow

## Headless-Chromium test of the served app (Debian chromium; no browser download).
test-browser: $(STAMP)
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	$(PYTEST) -q -m browser -s

test-all: test test-slow test-browser

## Rebuild the shipped demo run (about 10 minutes on 2 CPU cores).
demo-run: $(STAMP)
	$(BIN)/attribution train --dataset mnist5k --limit 1000 --resolution 16 --preset tiny \
	    --steps 4000 --seed 0 --out $(DEMO)
	$(BIN)/attribution sample --run $(DEMO) -n 16 --seed 0 --trajectory --name queries

## Rebuild the shipped CIFAR-2 run from ../shared/data (about 25 minutes on 2 CPU cores).
CIFAR_NPZ ?= $(abspath $(CURDIR)/../shared/data/cifar10_partial_train.npz)
demo-cifar2: $(STAMP)
	test -f $(CIFAR_NPZ) || { echo "no $(CIFAR_NPZ): set CIFAR_NPZ=path/to/cifar10 npz"; exit 2; }
	$(BIN)/python demo/make_cifar2_subset.py $(CIFAR_NPZ)
	cd demo/cifar2 && OMP_NUM_THREADS=1 ../../$(BIN)/attribution train --dataset npz --data-path data/train.npz \
	    --preset tiny --steps 4800 --batch-size 32 --ema-decay 0.995 --hflip --seed 0 --out .
	OMP_NUM_THREADS=1 $(BIN)/attribution sample --run demo/cifar2 -n 12 --seed 0 --trajectory --name queries

## Benchmarks (results in bench/results/); minutes each on 2 CPU cores.
bench: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python bench/bench_foundation.py --threads 1 2 --sample-steps 30
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_influence.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_baselines.py
	$(BIN)/python bench/bench_rescore_scale.py

## LDS ground truth + table for the demo run (resumable; about 2 h on 2 CPU cores).
lds-demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/lds_demo.py

## LDS benchmark of the shipped CIFAR-2 run at the paper's retraining rule (half the steps on half the
## data: 2,400-step retrains), M = 8 subsets x R = 2 paired seeds: ground truth, every method's LDS at
## equal budgets, counterfactual, then LDS against the number of draws; resumable (~2 h on 2 CPU cores).
lds-cifar2: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/lds_demo.py --run demo/cifar2 --subsets 8 --seeds 2 --steps 2400 \
	  --warmup-steps 50
	OMP_NUM_THREADS=1 $(BIN)/python bench/lds_vs_draws.py --run demo/cifar2

## Gallery stability at the defaults, two seeds, round by round (bench/results/gallery_*.md).
bench-gallery: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_gallery.py --run demo/run --out bench/results/gallery_demo
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_gallery.py --run demo/cifar2 --out bench/results/gallery_cifar2

## Browser: first gallery on a fresh copy of each shipped run (bench/results/first_gallery.md).
bench-first-gallery: $(STAMP)
	$(BIN)/python bench/bench_first_gallery.py --runs demo/run,demo/cifar2

## The default K-FAC factors the shipped runs carry (after retraining a shipped model; then update
## the two hashes in .gitignore; tests/test_shipped_factors.py checks them against a fresh build).
ship-factors: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m attribution build --run demo/run --what factors --quiet
	OMP_NUM_THREADS=1 $(BIN)/python -m attribution build --run demo/cifar2 --what factors --quiet

clean-venv:
	rm -rf $(VENV)
