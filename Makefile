# tpfleet — build, test, lint and fixture targets. `make test` is the README's test command and what CI runs.
GO          ?= go
BIN         := $(CURDIR)/bin
STATICCHECK := $(BIN)/staticcheck
STATICCHECK_VERSION := v0.8.2
MODEL       ?= testdata/fixtures/moe-top1

.PHONY: build run test lint fmt-check vet staticcheck unit fuzz-seeds fixtures clean

build:
	$(GO) build -o $(BIN)/tpfleet ./cmd/tpfleet

# The README's run command: greedy generation on a tiny checkpoint shipped in testdata/.
run: build
	$(BIN)/tpfleet generate --model $(MODEL) --ids 1,475,188,269,460 --max-tokens 16 --temperature 0

test: lint unit

lint: fmt-check vet staticcheck

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt differences in:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

$(STATICCHECK):
	GOBIN=$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

staticcheck: $(STATICCHECK)
	$(STATICCHECK) ./...

# Unit, golden and multi-process tests; fuzz targets run their seed corpora as ordinary tests.
unit:
	$(GO) test -race -timeout 20m ./...

# Regenerates testdata/fixtures with HF transformers; needs PyTorch and transformers (the GPU machine).
fixtures:
	python3 scripts/fixtures/make_fixtures.py --out testdata/fixtures

clean:
	rm -rf $(BIN)
