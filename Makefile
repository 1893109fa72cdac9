# snowflock: the two commands a new machine needs are `make demo` and `make test`.

GUEST_TARGET := x86_64-unknown-linux-gnu
CARGO ?= cargo
SNOWFLOCK := ./target/release/snowflock

.PHONY: all setup build guest image demo test unit lint bench clean fuzz

all: build

setup:
	bash scripts/setup.sh

# Host binaries (snowflock, snowflockd, libsnowflock.so) and the static guest
# binaries (agent, sf, sf-memtest, sf-swdemo) that go into the image.
build:
	$(CARGO) build --release --workspace
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release \
		--target $(GUEST_TARGET) -p snowflock-guest -p snowflock-demo --bins

image: build
	$(SNOWFLOCK) image build

# The guest package, target/deb/snowflock-guest_<version>_amd64.deb: the
# agent, sf, libsnowflock and a systemd unit for a user's own Debian VM
# (docs/guest-install.md).
.PHONY: deb
deb: build
	$(SNOWFLOCK) image deb --out target/deb

demo: setup build image
	$(SNOWFLOCK) demo

# Unit tests, host-side agent tests, and integration tests that boot real
# VMs (one at a time: they are CPU-bound under TCG).
test: setup build
	SNOWFLOCK_REQUIRE_VM=1 $(CARGO) test --release --workspace -- --test-threads=1
	python3 guest-agent/python/test_snowflock.py

# Format and lints; CI runs this before the tests.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace --lib

bench: setup build image
	$(SNOWFLOCK) daemon start --netns sfbench-h0 --state-dir /dev/shm/snowflock-bench --host h0
	$(SNOWFLOCK) bench clone --clones 1,2,4,8 --runs 5; rc=$$?; $(SNOWFLOCK) daemon stop; exit $$rc

# Fuzzing, not part of `make test` (see docs/reliability.md): every target
# of fuzz/ for FUZZ_SECS seconds. cargo-fuzz needs nightly flags; the
# stable toolchain accepts them with RUSTC_BOOTSTRAP=1.
FUZZ_SECS ?= 30
FUZZ_TARGETS ?= descriptor page_wire mcast_datagram channel_lines frame admin_msg api_msg sibling_msg handshake_server handshake_client
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		case $$t in page_wire|handshake_*) dict= ;; *) dict=-dict=json.dict ;; esac; \
		mkdir -p corpus/$$t && \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t corpus/$$t seeds/$$t -- \
			-max_total_time=$(FUZZ_SECS) -print_final_stats=1 $$dict $(FUZZ_ARGS) || exit 1; \
	done

clean:
	$(CARGO) clean
