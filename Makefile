# The two commands in README.md: `make run` and `make test`. Both install what they need first.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nullbox-installed

.PHONY: run demo test lint typecheck unit bench deps clean image kernel

deps: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.py
	/usr/bin/python3 scripts/bootstrap.py

run: image
	qemu/run

demo: deps
	$(BIN)/python -m ctxgraph demo

test: deps lint typecheck unit

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: deps
	$(BIN)/mypy

# the e2e boots and the agent-VM tests use the NullBox kernels: built first (cached by source, fragment, builder)
unit: deps kernel
	$(BIN)/pytest

# the image boots the NullBox appliance kernel when it is built and up to date (image/bootkernel.py): build it first
image: deps kernel
	$(BIN)/python -m image.build

kernel: deps
	$(BIN)/python -m kernel.build all

bench: deps
	$(BIN)/python -m bench.ctxgraph_bench
	$(BIN)/python -m bench.egress_bench
	$(BIN)/python -m bench.nulld_bench
	$(BIN)/python -m bench.image_bench
	$(BIN)/python -m bench.kernel_bench
	$(BIN)/python -m bench.agent_vm_boot
	$(BIN)/python -m bench.nullctl_bench
	$(BIN)/python -m bench.cage_bench

clean:
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache .hypothesis
