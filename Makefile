# tpfleet — build, test, lint and fixture targets. `make test` is the README's test command and what CI runs.
GO          ?= go
BIN         := $(CURDIR)/bin
STATICCHECK := $(BIN)/staticcheck
STATICCHECK_VERSION := v0.8.2
HELM        := $(BIN)/helm
HELM_VERSION := v4.3.2
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
MODEL       ?= testdata/fixtures/moe-top1

.PHONY: build run generate test lint fmt-check mod-check vet staticcheck kernels-check unit deploy-check helm fixtures proto proto-check protoc clean

build:
	$(GO) build -o $(BIN)/tpfleet ./cmd/tpfleet

# The README's run command: serve a tiny checkpoint shipped in testdata/ on this machine (embedded etcd, a
# coordinator and two CPU workers at TP=2) until Ctrl-C.
# Every port is a variable: LISTEN (gRPC), HOST and PORT (the OpenAI HTTP gateway), ETCD_LISTEN.
LISTEN      ?= 127.0.0.1:7070
HOST        ?= 127.0.0.1
PORT        ?= 8000
ETCD_LISTEN ?= 127.0.0.1:2379
run: build
	$(BIN)/tpfleet serve $(MODEL) --tensor-parallel-size 2 --host $(HOST) --port $(PORT) --listen $(LISTEN) --etcd-listen $(ETCD_LISTEN)

# One-shot greedy generation in this process, no server.
generate: build
	$(BIN)/tpfleet generate --model $(MODEL) --ids 1,475,188,269,460 --max-tokens 16 --temperature 0

test: lint proto-check unit deploy-check

lint: fmt-check mod-check vet staticcheck kernels-check

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt differences in:"; echo "$$out"; exit 1; fi

# go.mod and go.sum must be what `go mod tidy` makes: direct dependencies marked direct, nothing unused.
mod-check:
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy and commit"; exit 1; }

vet:
	$(GO) vet ./...

$(STATICCHECK):
	GOBIN=$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

staticcheck: $(STATICCHECK)
	$(STATICCHECK) ./...

# The CUDA kernels are compiled only on a GPU (NVRTC); clang checks their syntax and types here. clang-14
# comes from Debian when missing.
kernels-check:
	@command -v clang-14 >/dev/null || command -v clang >/dev/null || { command -v apt-get >/dev/null && (apt-get update -q && apt-get install -y -q clang-14) >/dev/null; } \
	  || { echo "clang not found: install clang-14"; exit 1; }
	@bash scripts/gpu/cucheck.sh

# protoc comes from Debian's protobuf-compiler (3.21.12 on bookworm); the plugins are pinned Go modules.
protoc:
	@command -v protoc >/dev/null || { command -v apt-get >/dev/null && (apt-get update -q && apt-get install -y -q protobuf-compiler) >/dev/null; } \
	  || { echo "protoc not found: install protobuf-compiler"; exit 1; }
	@test -x $(BIN)/protoc-gen-go || GOBIN=$(BIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	@test -x $(BIN)/protoc-gen-go-grpc || GOBIN=$(BIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

# Regenerates proto/tpfleet/v1/*.pb.go from the .proto files.
proto: protoc
	cd proto && PATH=$(BIN):$$PATH $(GO) generate ./...

# Fails when the committed generated code differs from what the .proto files generate.
proto-check: proto
	@git diff --exit-code -- proto || { echo "proto: generated code is stale; run make proto and commit"; exit 1; }

# Unit, golden and multi-process tests; fuzz targets run their seed corpora as ordinary tests.
unit:
	$(GO) test -race -timeout 20m ./...

# helm, pinned, built from its module (CI has no other way to get it); the first build takes minutes, later
# ones come from bin/ or the Go build cache.
$(HELM):
	GOBIN=$(BIN) $(GO) install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)

helm: $(HELM)

# deploy/ is a Go module of its own, so that k8s.io/api (which its tests decode the rendered manifests
# into) stays out of tpfleet's go.mod and -race run: the same tidiness, vet and staticcheck checks, then
# its tests: the Dockerfile's go build line, helm lint --strict and helm template of the example value
# sets with strict decoding, the values schema, and the CPU demo chart run as local processes.
deploy-check: $(HELM) $(STATICCHECK)
	@cd deploy && { $(GO) mod tidy -diff || { echo "deploy/go.mod is not tidy: cd deploy && go mod tidy"; exit 1; }; }
	cd deploy && $(GO) vet ./... && $(STATICCHECK) ./...
	cd deploy && HELM=$(HELM) $(GO) test -count=1 -timeout 15m ./...

# Regenerates testdata/fixtures, testdata/quant and testdata/tokenizer/golden.json with HF transformers and tokenizers; needs
# PyTorch, transformers and tokenizers (the GPU machine).
fixtures:
	python3 scripts/fixtures/make_fixtures.py --out testdata/fixtures
	python3 scripts/fixtures/make_tokenizer_golden.py
	python3 scripts/fixtures/make_quant_fixtures.py --fixtures testdata/fixtures --out testdata/quant

clean:
	rm -rf $(BIN)
