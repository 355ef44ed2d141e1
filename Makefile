# Two entry points: `make demo` (install + run every stage on Fashion-MNIST,
# offline) and `make test` (install + run the test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST ?= /usr/share/datasets/fashion-mnist
DEMO := runs/demo

.PHONY: demo test test-fast crash-check venv fashion-mnist clean-demo roundtrip

venv: $(STAMP)

# Re-installs when pyproject.toml or the install script changes; with uv when it can be had, else pip
# (tools/install-venv.sh; MCPIPE_INSTALL_WITH=pip forces pip). torch/torchvision are pinned to the versions in
# this machine's local wheel store (see pyproject.toml).
$(STAMP): pyproject.toml tools/install-venv.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash tools/install-venv.sh $(VENV) '.[dev,offline-weights,timm]'
	touch $(STAMP)

# Every test, on as many pytest workers as there are cores (pytest-xdist), a test file per worker at a time
# (files share module fixtures, e.g. a reference run started beside their tests). `make test-fast`: the tests
# not marked slow, under a minute.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow" tests

# The newcomer's crash check: extract 1,200 PNGs (default DataLoader workers), kill -9 it mid-run, run the same
# command at once: it resumes (no "being written by another process"), and the store equals an uninterrupted
# run's bit for bit.
crash-check: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/test_preemption_extract.py -k kill9_then_the_same_command_at_once

fashion-mnist:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FMNIST)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's dataset-fashion-mnist (apt-get)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else \
	  echo "Fashion-MNIST is missing and this is not root: run 'sudo apt-get install dataset-fashion-mnist' (or set FMNIST=DIR)"; \
	  exit 1; \
	fi

# Stage 1 on Fashion-MNIST with ImageNet-trained EfficientNet-Lite0 at 96 px:
# a seeded 10,000-image training subset and 10,000 test images. Stage 2: the
# softmax baseline (N = 1) and MetaCleaner (N = 4) at 0-60% uniform label
# flips, in one sweep of fixed configurations; then the default (train.auto),
# which chooses on a validation hold-out, at 40%. Stage 3: one epoch of end-to-end fine-tuning from the 40%
# MetaCleaner head (exporting the epoch chosen on validation, the head itself included), then predict. `mcpipe report` draws every figure; the accuracy figure is
# copied to docs/ for the README.
DEMO_HEAD := $(DEMO)/noise/005-rate=0.4,subset_size=4
demo: $(STAMP) fashion-mnist
	@echo "== stage 1: features of 10,000 training and 10,000 test images (EfficientNet-Lite0, ImageNet weights, 96 px)"
	$(BIN)/mcpipe extract --out $(DEMO)/features --set data.source=fashion-mnist --set data.root=$(FMNIST) \
	  --set extract.backbone=efficientnet_lite0 --set extract.image_size=96 \
	  --set 'data.splits=["train"]' --set data.limit=10000
	$(BIN)/mcpipe extract --out $(DEMO)/features --set data.source=fashion-mnist --set data.root=$(FMNIST) \
	  --set extract.backbone=efficientnet_lite0 --set extract.image_size=96 \
	  --set 'data.splits=["test"]' --set data.limit=10000
	$(BIN)/mcpipe inspect $(DEMO)/features/train.h5
	@echo "== stage 2: the paper's comparison, softmax baseline (N = 1) vs MetaCleaner (N = 4), fixed configurations (train.auto=false), 0-60% of the training labels flipped"
	$(BIN)/mcpipe sweep --features $(DEMO)/features --out $(DEMO)/noise --log-level warning --set train.auto=false \
	  --set noise.kind=symmetric --set 'sweep.noise.rate=[0.0, 0.2, 0.4, 0.6]' --set 'sweep.cleaner.subset_size=[1, 4]'
	@echo "== the report: test accuracy (AUROC of finding the flipped labels), baseline and MetaCleaner side by side"
	$(BIN)/mcpipe report $(DEMO)/noise
	@echo "== stage 2, the default: mcpipe chooses N, weight decay, epochs and a second round on a validation hold-out (40% flipped)"
	$(BIN)/mcpipe train-head --features $(DEMO)/features --out $(DEMO)/auto40 --overwrite --log-level warning \
	  --set noise.kind=symmetric --set noise.rate=0.4
	mkdir -p docs && cp $(DEMO)/noise/report/accuracy_vs_noise.png docs/demo-accuracy-vs-noise.png
	@echo "== stage 3: one epoch of end-to-end fine-tuning with the cleaner (2,000 images, 96 px, CPU) from the 40% MetaCleaner head;"
	@echo "   model.pt is the epoch chosen on validation, the head itself (epoch 0) a candidate; then predict"
	$(BIN)/mcpipe finetune --head '$(DEMO_HEAD)' --out $(DEMO)/finetune --overwrite \
	  --log-level warning --set data.source=fashion-mnist --set data.root=$(FMNIST) --set data.limit=2000 \
	  --set extract.backbone=efficientnet_lite0 --set extract.image_size=96 \
	  --set noise.kind=symmetric --set noise.rate=0.4 --set finetune.epochs=1 --set finetune.batch_size=32 \
	  --set finetune.lr=0.001 --set finetune.backbone_lr=0.0001 --set finetune.crop_scale=0.35 \
	  --set finetune.warmup_epochs=0.3
	$(BIN)/mcpipe report $(DEMO)/finetune
	$(BIN)/python -c "from mcpipe.config import DataConfig; from mcpipe.extract.sources.registry import load_index; \
	  import pathlib; d = pathlib.Path('$(DEMO)/images'); d.mkdir(parents=True, exist_ok=True); \
	  ix = load_index(DataConfig(source='fashion-mnist', root='$(FMNIST)', limit=6, subset='first'), 'test'); \
	  [ix.load(i).save(d / f'{i}-{ix.classes[ix.labels[i]]}.png') for i in range(len(ix))]"
	$(BIN)/mcpipe predict --model $(DEMO)/finetune --out $(DEMO)/predictions.csv --top-k 3 $(DEMO)/images
	cat $(DEMO)/predictions.csv
	@echo "== done: open $(DEMO)/noise/report/index.html (stage 2) and $(DEMO)/finetune/report/index.html (stage 3)"

# Labels out and back in, on the demo's features (after make demo): the 40% default run's flagged labels
# dropped, or replaced by its suggestions, then the default trained again on each label file.
RT := $(DEMO)/roundtrip
roundtrip: $(STAMP)
	@test -f $(DEMO)/auto40/metrics.json || { echo "run make demo first: roundtrip starts from $(DEMO)/auto40"; exit 1; }
	mkdir -p $(RT)
	$(BIN)/mcpipe clean $(DEMO)/auto40 --out $(RT)/cleaned-drop.csv --action drop --overwrite
	$(BIN)/mcpipe clean $(DEMO)/auto40 --out $(RT)/cleaned-relabel.csv --action relabel --overwrite
	$(BIN)/mcpipe train-head --features $(DEMO)/features --out $(RT)/dropped --labels $(RT)/cleaned-drop.csv \
	  --overwrite --log-level warning
	$(BIN)/mcpipe train-head --features $(DEMO)/features --out $(RT)/relabelled --labels $(RT)/cleaned-relabel.csv \
	  --overwrite --log-level warning

clean-demo:
	rm -rf $(DEMO)
