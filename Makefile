# Two entry points for a fresh clone: `make demo` (main job on embedded data) and `make test`.
PYTHON ?= python3
# The local CPU build of torch; a bare `torch>=2.3` could otherwise pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH_PIN)
	@$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m mgd select --dataset digits --corruption mixed --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m pip install -q -e ".[bench]"   # the peers: higher, TorchOpt
	$(PYTHON) benchmarks/bench_grad.py --markdown --out bench-results.json
