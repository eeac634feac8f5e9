# weft — build, test, benchmark and demo. Privileged targets (test, bench, demo) need root:
# they build throwaway network namespaces.

GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
BIN      := bin
PREFIX   ?= /usr/local
CNI_BIN  ?= /opt/cni/bin
CNI_CONF ?= /etc/cni/net.d

.PHONY: all build test bench bench-deps scale scale-deps demo demo-down lint install clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/weft ./cmd/weft
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/weft-cni ./cmd/weft-cni

# Every package's tests, the kernel ones included (they make and remove their own network
# namespaces). -p 1 keeps two kernel-heavy packages from fighting over the 2 cores.
test:
	$(GO) test -p 1 -count=1 -timeout 20m ./...

# Go benchmarks, then the side-by-side comparisons against the reference implementations,
# each measured in one run on this machine (medians and ratios, never one absolute time).
BENCH_PKGS := containernetworking-plugins iperf3 qperf dnsperf dnsmasq-base
bench: build bench-deps
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./...
	$(GO) run ./chaos-tests/bench/cni -bin $(BIN)
	$(GO) run ./chaos-tests/bench/dns
	$(GO) run ./chaos-tests/bench/datapath -bin $(BIN)
	$(GO) run ./chaos-tests/bench/relay -bin $(BIN) -n 5 -break link
	$(GO) run ./chaos-tests/bench/relay -bin $(BIN) -n 5 -break tunnel

bench-deps:
	@missing=$$(for p in $(BENCH_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# The control plane at scale with real processes (issue 11): N `weft peer` processes in
# network namespaces, then N Debian `serf` agents on the same kind of lab as the anchor;
# see-all time, idle CPU and RSS per peer, container pings, side by side. Minutes per N;
# never part of `make test`. SCALE_N=25,50 and SCALE_FLAGS='-window 10s' to shorten it.
SCALE_PKGS  := serf containernetworking-plugins iputils-ping iproute2
SCALE_N     ?= 50,100
SCALE_FLAGS ?=
scale: build scale-deps
	$(GO) run ./chaos-tests/bench/scale -bin $(BIN) -n $(SCALE_N) -serf $(SCALE_FLAGS)

scale-deps:
	@missing=$$(for p in $(SCALE_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# A lab on this machine: hosts and containers in network namespaces, real weft peers.
demo: build
	$(GO) run ./chaos-tests/demo -bin $(BIN)

demo-down:
	$(GO) run ./chaos-tests/demo -down

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(CNI_BIN) $(DESTDIR)$(CNI_CONF)
	install -m 0755 $(BIN)/weft $(DESTDIR)$(PREFIX)/bin/weft
	install -m 0755 $(BIN)/weft-cni $(DESTDIR)$(CNI_BIN)/weft
	install -m 0644 cni/10-weft.conflist $(DESTDIR)$(CNI_CONF)/10-weft.conflist

clean:
	rm -rf $(BIN)
