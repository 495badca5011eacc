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
	$(PYTHON) -m pip install -q -e ".[bench,hf]"   # the peers: higher, TorchOpt
	# bergson beside our torch: --no-deps, then what bergson.magic imports (peers.md §5)
	$(PYTHON) -m pip install -q --no-deps bergson==2.5.1
	$(PYTHON) -m pip install -q datasets simple-parsing ml_dtypes petname jaxtyping optree graphviz scipy
	$(PYTHON) benchmarks/bench_grad.py --markdown --out bench-results.json
	$(PYTHON) benchmarks/bench_runs.py --markdown --out bench-runs.json
