# Loom. `make` lists the targets.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(HOME)/go/bin:$(PATH)
GO ?= go
GOLANGCI_VERSION ?= v2.6.2
DATA ?= $(CURDIR)/.loom
# A count, not a duration: with a duration, Go 1.26's fuzz coordinator can fail a
# target that found nothing with "context deadline exceeded" when the deadline
# races a busy worker (golang/go#75804, fixed in Go 1.27). A count has no deadline.
# 150000 runs take about 10 s here.
FUZZTIME ?= 150000x

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

deps: ## install what Loom needs on this machine (Debian's libvirt and QEMU, Go modules)
	@ops/libvirt/install.sh --qemu
	@$(GO) mod download

build: ## build bin/loom
	$(GO) build -o bin/loom ./cmd/loom

run: deps build ## start everything on this machine: embedded NATS, control plane, 3 simulated hosts
	bin/loom up --data-dir $(DATA)

test: deps verify ## everything CI runs: unit, integration on real NATS/Pebble/libvirtd, short fuzzing
	$(GO) vet -tags integration ./...
	$(GO) test -race -count=1 -tags integration -timeout 30m ./...
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeRecord$$' -fuzztime $(FUZZTIME) ./events
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeCommand$$' -fuzztime $(FUZZTIME) ./events

bench: deps build ## the speed figures of the README, each as a ratio to a baseline measured in the same run
	bin/loom bench

lint: ## golangci-lint (installed on first use)
	@command -v golangci-lint >/dev/null || $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_VERSION)
	golangci-lint run ./...
	golangci-lint run --build-tags integration ./...

generate: ## regenerate the Go code and schemas that come from schemas/
	$(GO) generate ./...
	$(GO) test ./events -run Schemas -rewrite

verify: ## gofmt, go.mod tidy, generated code in sync, one-way imports
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod is not tidy: run go mod tidy"; exit 1; }
	@$(GO) run ./schemas/errgen -in schemas/errors.json -out /tmp/loom-errors-gen.go && cmp -s /tmp/loom-errors-gen.go events/errors_gen.go || { echo "events/errors_gen.go is stale: make generate"; exit 1; }
	@ops/ci/check-imports.sh

check: lint test ## what CI runs

clean: ## remove build output and the default data dir
	rm -rf bin $(DATA)

.PHONY: help deps build run test bench lint generate verify check clean
