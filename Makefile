# The two commands of the README: `make demo` (the main job on its bundled default) and
# `make test` (install, lint, tests). Both install what they need; torch comes first, pinned to
# the CPU build this machine kind carries, so no CUDA wheels are pulled.
PY ?= python3
PIP = $(PY) -m pip
TORCH ?= torch==2.13.0

.PHONY: install install-test demo demo-quick merge-demo test lint bench clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .

install-test:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"

# the paper's experiment in miniature: trains tiny models (cached), evolves PS / PS+DFS / DFS merges,
# scores everything on held-out problems, writes examples/toy_world/RESULTS.md
demo: install
	$(PY) examples/toy_world/demo.py

demo-quick: install
	$(PY) examples/toy_world/demo.py --quick

# a plain merge of a locally generated tiny Llama family, four recipes, then load + generate
merge-demo: install
	$(PY) examples/tiny_merge/run.py

lint: install-test
	$(PY) -m ruff check fastmerge kernels tests bench examples

test: install-test lint
	$(PY) -m pytest -q

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/compare_mergekit.py

clean:
	rm -rf build *.egg-info .pytest_cache
