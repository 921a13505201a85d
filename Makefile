# Two commands matter: `make run` (set up and start a dev broker) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP_VERSION := 26.3
GENERATED := broker/api clients/python/src/credentialbroker_client/_proto clients/node/src/gen
NODE := clients/node
# npm ci (from the committed lockfile) also builds the client's dist/ (its prepare script).
NODE_STAMP := $(NODE)/node_modules/.package-lock.json

.PHONY: install run test test-python test-node lint proto proto-check docs docs-check bench clean

# The client distribution holds the generated code the server imports: install both at once,
# with the dev tools (devtools/: bench, fake OAuth server, demo provider) beside them.
$(STAMP): pyproject.toml clients/python/pyproject.toml devtools/pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt \
		-e clients/python -e '.[dev]' -e devtools
	touch $(STAMP)

install: $(STAMP)

$(NODE_STAMP): $(NODE)/package.json $(NODE)/package-lock.json
	cd $(NODE) && npm ci --no-audit --no-fund

## Start a dev broker (SQLite, key and caller token under ./.broker/) on 127.0.0.1:50051, with
## the demo OAuth provider on 127.0.0.1:8765.
run: install
	$(BIN)/broker serve --dev --demo-provider

## Run the test suite: pytest, then the Node client's tests (npm ci first); the PostgreSQL
## tests of both need BROKER_TEST_DATABASE_URL.
test: test-python test-node

test-python: install
	$(BIN)/pytest

## The Node client's tests (clients/node: tsc --noEmit strict, then node --test against real
## broker processes).
test-node: install $(NODE_STAMP)
	cd $(NODE) && npm test

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy broker tests scripts clients/python/src devtools/src
	$(BIN)/lint-imports --no-cache

## Regenerate the clients' generated code (clients/python/src/credentialbroker_client/_proto,
## clients/node/src/gen) and broker/api's re-export modules from protos/.
proto: install $(NODE_STAMP)
	$(BIN)/python scripts/genproto.py

## Fail if the generated code in git differs from what `make proto` produces.
proto-check: proto
	git diff --exit-code -- $(GENERATED)
	test -z "$$(git status --porcelain -- $(GENERATED))"

## Build the docs site into build/site (mkdocs.yml), strictly: a broken link fails. The
## configuration and API reference pages are generated first (scripts/gendocs.py).
docs: install
	$(BIN)/python scripts/gendocs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

## Fail if the generated reference pages in git differ from what `make docs` produces.
docs-check: docs
	git diff --exit-code -- docs/reference
	test -z "$$(git status --porcelain -- docs/reference)"

## The benchmark: GetAccessToken against the gRPC echo floor (docs/benchmarks.md), then Proxy
## against calling the same local API directly with the token.
bench: install
	$(BIN)/broker bench --standard
	$(BIN)/python -m broker_devtools.bench.proxy

clean:
	rm -rf $(VENV) .broker build *.egg-info $(NODE)/node_modules $(NODE)/dist $(NODE)/.test-build
