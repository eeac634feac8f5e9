# weft — build, test, benchmark and demo. Privileged targets (test, bench, demo) need root:
# they build throwaway network namespaces.

GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
BIN      := bin
PREFIX   ?= /usr/local
CNI_BIN  ?= /opt/cni/bin
CNI_CONF ?= /etc/cni/net.d

.PHONY: all build test fuzz race bench bench-deps scale scale-deps demo demo-deps demo-down lint install clean

# apt_install installs the Debian packages of $(1) that are missing (as root, on Debian or
# Ubuntu), so a target works on a fresh machine whatever ran before it.
apt_install = missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing $$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/weft ./cmd/weft
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/weft-cni ./cmd/weft-cni

# Every package's tests, the kernel ones included (they make and remove their own network
# namespaces). -p 1 keeps two kernel-heavy packages from fighting over the 2 cores.
test:
	$(GO) test -p 1 -count=1 -timeout 20m ./...

# Every fuzz target of the repository, found by name (func FuzzX in a *_test.go file), so a
# new one joins without an edit here; each runs FUZZTIME, one after another, and the first
# crash stops the run (its input is left in the package's testdata/fuzz/ to re-run); a bare
# "context deadline exceeded" with no failing input is Go 1.26's coordinator racing its own
# deadline (golang/go#75804), reported and passed over. One
# worker each (-parallel 1): the router's target runs a real peer, one per namespace, and the
# machine is shared. The router's target needs root, like its package's tests.
FUZZTIME  ?= 10s
FUZZFLAGS ?= -parallel 1 -fuzzminimizetime 10s
fuzz:
	@set -e; grep -rlE --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*\(' . | sort | while read -r file; do \
		dir=$$(dirname "$$file"); \
		for name in $$(sed -nE 's/^func (Fuzz[A-Za-z0-9_]*)\(.*/\1/p' "$$file"); do \
			echo "== $$dir $$name ($(FUZZTIME))"; \
			out=$$(mktemp); rc=0; \
			$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $(FUZZFLAGS) "$$dir" >"$$out" 2>&1 || rc=$$?; \
			cat "$$out"; \
			if [ $$rc -ne 0 ]; then \
				if grep -q 'context deadline exceeded' "$$out" && ! grep -q 'Failing input written' "$$out"; then \
					echo "note: not a crash: Go's fuzz coordinator raced its own -fuzztime deadline (golang/go#75804, fixed in Go 1.27)"; \
				else rm -f "$$out"; exit 1; fi; \
			fi; \
			rm -f "$$out"; \
		done; \
	done

# The race detector on every package whose tests need no root (no namespaces, no netlink):
# the others are the kernel ones. Run as root (as CI does), they run without any capability
# (setpriv drops them), so a package that starts to need root fails here instead of passing
# quietly; run as another user, they simply run.
# About 2 minutes on 2 cores, the race build included; .ci/run runs it.
RACE_PKGS := ./chaos-tests/bench/scale ./chaos-tests/bench/sim ./cmd/weft ./cni ./datapath/plan \
	./datapath/netpol ./dns ./ipam ./mesh ./mesh/identity ./mesh/pathsel ./mesh/segments ./router/page
race:
	$$([ "$$(id -u)" = 0 ] && command -v setpriv >/dev/null && echo setpriv --bounding-set -all --inh-caps -all) \
		$(GO) test -race -count=1 -timeout 10m $(RACE_PKGS)

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
	@$(call apt_install,$(BENCH_PKGS))

# The control plane at scale (issue 11), two ways. First an in-process simulation: N peers on
# loopback addresses in one process (real memberlist, probers, link state and path choice, a
# recording fake datapath), traffic per peer by kind, CPU, heap and the exponent of each cost
# in N. Then real processes: N `weft peer` processes in
# network namespaces, then N Debian `serf` agents on the same kind of lab as the anchor;
# see-all time, idle CPU and RSS per peer, container pings, side by side. Minutes per N;
# never part of `make test`. SCALE_N=25,50 and SCALE_FLAGS='-window 10s' to shorten it.
SCALE_PKGS  := serf containernetworking-plugins iputils-ping iproute2
SCALE_N     ?= 50,100
SCALE_FLAGS ?=
SIM_N       ?= 50,100,200,500
scale: build scale-deps
	$(GO) run ./chaos-tests/bench/sim -n $(SIM_N) -membership-only-n 1000 -seconds 30 -converge-timeout 90s
	$(GO) run ./chaos-tests/bench/scale -bin $(BIN) -n $(SCALE_N) -serf $(SCALE_FLAGS)

scale-deps:
	@$(call apt_install,$(SCALE_PKGS))

# A lab on this machine: hosts and containers in network namespaces, real weft peers. The
# lab shells out to `ip` (netns exec) and the demo to `ping`, so demo-deps installs them.
# Ctrl-C (or Enter) tears the lab down and the demo exits 0. It runs as a built binary, not
# under `go run` (which exits 1 after a SIGINT whatever its child did), and on a terminal it
# takes the foreground process group, so Ctrl-C reaches the demo alone and make sees its 0.
DEMO_PKGS := iproute2 iputils-ping
demo: build demo-deps
	$(GO) build -o $(BIN)/weft-demo ./chaos-tests/demo
	$(BIN)/weft-demo -bin $(BIN)

demo-deps:
	@$(call apt_install,$(DEMO_PKGS))

demo-down:
	$(GO) build -o $(BIN)/weft-demo ./chaos-tests/demo
	$(BIN)/weft-demo -down

# gofmt, go vet, and go.mod as `go mod tidy` would write it (direct dependencies marked as
# such): each fails the target on a finding.
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; }

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(CNI_BIN) $(DESTDIR)$(CNI_CONF)
	install -m 0755 $(BIN)/weft $(DESTDIR)$(PREFIX)/bin/weft
	install -m 0755 $(BIN)/weft-cni $(DESTDIR)$(CNI_BIN)/weft
	install -m 0644 cni/10-weft.conflist $(DESTDIR)$(CNI_CONF)/10-weft.conflist

clean:
	rm -rf $(BIN)
