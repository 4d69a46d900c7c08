# clipfast: `make demo` and `make test` each create .venv on first use and reuse it after.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DATA := data/demo

.PHONY: demo demo-clipa test bench lint clean-demo

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# Build DeepSpeed's CPU shared-memory comm op now (about 80 s once, cached): part of installing, not of training.
	# (import clipfast first: it names this venv's own extensions folder, clipfast/__init__.py)
	$(BIN)/python -c "import clipfast, torch; from deepspeed.accelerator import get_accelerator as g; b = None if torch.cuda.is_available() else g().create_op_builder('ShareMemCommBuilder'); b and b.load() and print('DeepSpeed shm comm op ready')"
	touch $(STAMP)

$(DEMO_DATA)/meta.json: $(STAMP)
	$(BIN)/python -m clipfast.data.demo --out $(DEMO_DATA)

demo: $(STAMP) $(DEMO_DATA)/meta.json
	rm -rf runs/demo
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed clipfast/train.py --config configs/demo.py
	$(BIN)/python -m clipfast.plot runs/demo
	@echo "demo done: metrics in runs/demo/metrics.jsonl, zero-shot result in runs/demo/eval.json, curves in runs/demo/curves.png"

# The CLIPA variant of the demo: pre-train at 16 px / 8 tokens, fine-tune at 32 px / 16 (configs/demo_clipa.py).
demo-clipa: $(STAMP) $(DEMO_DATA)/meta.json
	rm -rf runs/demo_clipa
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed clipfast/train.py --config configs/demo_clipa.py
	$(BIN)/python -m clipfast.plot runs/demo_clipa
	@echo "demo-clipa done: per-stage metrics in runs/demo_clipa/<stage>/, summary in runs/demo_clipa/stages.json, zero-shot result in runs/demo_clipa/eval.json, curves in runs/demo_clipa/curves.png"

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

lint: $(STAMP)
	$(BIN)/ruff check clipfast kernels bench configs tests
