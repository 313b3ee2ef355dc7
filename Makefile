# fts-tokend: `make demo` to see it work, `make test` to run the tests (README "Quick start").
SWIFT   ?= swift
PREFIX  ?= /usr/local
DESTDIR ?=
# Debian packages the build needs: libsystemd's headers (CSystemd) and pkg-config to find them;
# openssl makes the test certificates for the HTTPS tests; curl, systemd-socket-activate and setpriv
# drive the socket tests.
APT_PACKAGES := libsystemd-dev pkg-config openssl curl systemd util-linux

.PHONY: all deps build test demo release clean

all: build

## deps: install the C build dependencies through apt when they are missing
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

build: deps
	$(SWIFT) build

## test: unit tests and the integration tests that run the real binary against the mock server
test: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

## demo: the mock auth server and the daemon in one process, rotating 20-second tokens
demo: build
	$(SWIFT) run --skip-build fts-tokend demo

## release: a binary that runs on hosts without a Swift runtime
release: deps
	$(SWIFT) build -c release --static-swift-stdlib
	@ls -l .build/release/fts-tokend

clean:
	rm -rf .build
