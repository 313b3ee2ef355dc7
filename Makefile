# fts-tokend: `make demo` to see it work, `make test` to run the tests (README "Quick start").
SHELL   := /bin/bash
SWIFT   ?= swift
PREFIX  ?= /usr/local
DESTDIR ?=
# Debian packages the build needs: libsystemd's headers (CSystemd) and pkg-config to find them;
# openssl makes the test certificates for the HTTPS tests; curl, systemd-socket-activate and setpriv
# drive the socket tests; postgresql is the real database the fleet tests start (TestPostgres).
APT_PACKAGES := libsystemd-dev pkg-config openssl curl systemd util-linux postgresql

VERSION := $(shell sed -n 's/.*static let version = "\(.*\)"/\1/p' Sources/fts-tokend/FTSTokend.swift)
# Where release builds go (a second folder keeps debug and release artefacts apart when wanted).
SCRATCH ?= .build
RELEASE_BIN := $(SCRATCH)/release/fts-tokend
UNITDIR ?= /lib/systemd/system
SYSUSERSDIR ?= /usr/lib/sysusers.d
TMPFILESDIR ?= /usr/lib/tmpfiles.d
DEB := dist/fts-tokend_$(VERSION)_amd64.deb

.PHONY: all deps build test test-contrib test-examples man completions lint format test-system soak demo release install deb bench bench-instructions bench-smoke clean

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

## test-contrib: the Prometheus alert rules checked and unit-tested by promtool (Debian's prometheus package)
test-contrib:
	@command -v promtool >/dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq prometheus >/dev/null; }
	promtool check rules contrib/prometheus/fts-tokend.rules.yml
	cd contrib/prometheus && promtool test rules fts-tokend.rules.test.yml
	python3 -m json.tool contrib/grafana/fts-tokend.json >/dev/null

## test-examples: every client example (examples/) against the mock server and a real daemon
test-examples: build
	@command -v node >/dev/null && command -v jq >/dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq nodejs jq >/dev/null; }
	bash examples/run-tests.sh $(SCRATCH)/debug/fts-tokend

## lint: swift-format (the toolchain's) with the rules in .swift-format; any finding fails
FORMATTED := Sources Tests Fuzz Package.swift
lint:
	$(SWIFT) format lint --strict --recursive --parallel $(FORMATTED)

## format: rewrite the sources as `make lint` wants them
format:
	$(SWIFT) format --in-place --recursive --parallel $(FORMATTED)

## demo: the mock auth server and the daemon in one process, rotating 20-second tokens
demo: build
	$(SWIFT) run --skip-build fts-tokend demo

## release: a binary that runs on hosts without a Swift runtime
release: deps
	$(SWIFT) build -c release --static-swift-stdlib --scratch-path $(SCRATCH)
	@ls -l $(RELEASE_BIN)

## install: the release binary, units, sysusers/tmpfiles snippets and the default config (PREFIX, DESTDIR)
install: release
	install -D -m 0755 $(RELEASE_BIN) $(DESTDIR)$(PREFIX)/bin/fts-tokend
	# As dh_strip does: no .comment or .note sections either (lintian's binary-has-unneeded-section).
	strip --remove-section=.comment --remove-section=.note $(DESTDIR)$(PREFIX)/bin/fts-tokend
	install -D -m 0644 systemd/fts-tokend.service $(DESTDIR)$(UNITDIR)/fts-tokend.service
	install -D -m 0644 systemd/fts-tokend@.service $(DESTDIR)$(UNITDIR)/fts-tokend@.service
	install -D -m 0644 systemd/fts-tokend-identity@.service $(DESTDIR)$(UNITDIR)/fts-tokend-identity@.service
	install -D -m 0644 systemd/fts-tokend.socket $(DESTDIR)$(UNITDIR)/fts-tokend.socket
	sed -i 's|/usr/bin/fts-tokend|$(PREFIX)/bin/fts-tokend|' $(DESTDIR)$(UNITDIR)/fts-tokend.service $(DESTDIR)$(UNITDIR)/fts-tokend@.service
	install -D -m 0644 systemd/fts-tokend.sysusers $(DESTDIR)$(SYSUSERSDIR)/fts-tokend.conf
	install -D -m 0644 systemd/fts-tokend.tmpfiles $(DESTDIR)$(TMPFILESDIR)/fts-tokend.conf
	install -D -m 0644 systemd/config.json $(DESTDIR)/etc/fts-tokend/config.json
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/fts-tokend/README.md
	install -D -m 0644 config.example.json $(DESTDIR)$(PREFIX)/share/doc/fts-tokend/config.example.json
	install -D -m 0644 contrib/prometheus/fts-tokend.rules.yml $(DESTDIR)$(PREFIX)/share/doc/fts-tokend/contrib/prometheus/fts-tokend.rules.yml
	install -D -m 0644 contrib/grafana/fts-tokend.json $(DESTDIR)$(PREFIX)/share/doc/fts-tokend/contrib/grafana/fts-tokend.json
	$(MAKE) man completions
	install -D -m 0644 dist/man/fts-tokend.8.gz $(DESTDIR)$(PREFIX)/share/man/man8/fts-tokend.8.gz
	install -D -m 0644 dist/man/fts-tokend.json.5.gz $(DESTDIR)$(PREFIX)/share/man/man5/fts-tokend.json.5.gz
	install -D -m 0644 dist/completions/fts-tokend.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/fts-tokend
	install -D -m 0644 dist/completions/_fts-tokend $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_fts-tokend
	install -D -m 0644 dist/completions/fts-tokend.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/fts-tokend.fish

## man: fts-tokend(8) generated from the command definitions (swift-argument-parser's generate-manual,
## run on the release binary), and fts-tokend.json(5) from docs/man; gzipped as Debian ships them
MANUAL_TOOL := $(SCRATCH)/debug/generate-manual
man: release
	$(SWIFT) build --product generate-manual --scratch-path $(SCRATCH)
	mkdir -p dist/man
	$(MANUAL_TOOL) $(RELEASE_BIN) --section 8 --date "$$(git log -1 --format=%cs 2>/dev/null || date +%F)" \
	    --authors "the fts-tokend maintainers" --output-directory dist/man
	# mdoc has no blank lines (groff warns of each: lintian's groff-message).
	sed '/^$$/d' dist/man/fts-tokend.8 | gzip -9n > dist/man/fts-tokend.8.gz
	gzip -9n -c docs/man/fts-tokend.json.5 > dist/man/fts-tokend.json.5.gz

## completions: bash, zsh and fish completion scripts from the same command definitions
completions: release
	mkdir -p dist/completions
	# Sourced by bash-completion, not run: no #! line (lintian's bash-completion-with-hashbang).
	$(RELEASE_BIN) --generate-completion-script bash | sed '1{/^#!/d}' > dist/completions/fts-tokend.bash
	$(RELEASE_BIN) --generate-completion-script zsh > dist/completions/_fts-tokend
	$(RELEASE_BIN) --generate-completion-script fish > dist/completions/fts-tokend.fish

## deb: an installable Debian package (dist/fts-tokend_VERSION_amd64.deb); units ship disabled.
## Depends: is what dpkg-shlibdeps (dpkg-dev) finds the stripped binary linked against, plus systemd
## (the maintainer scripts run systemd-sysusers and systemd-tmpfiles).
DEBIAN_SRC := systemd/debian
deb:
	@command -v dpkg-shlibdeps >/dev/null && command -v dpkg-parsechangelog >/dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq dpkg-dev >/dev/null; }
	@changelog=$$(dpkg-parsechangelog -l $(DEBIAN_SRC)/changelog -S Version); [ "$$changelog" = "$(VERSION)" ] || \
	  { echo "$(DEBIAN_SRC)/changelog's latest entry is $$changelog, the binary's version $(VERSION): add an entry" >&2; exit 1; }
	rm -rf dist/deb dist/shlibdeps
	$(MAKE) install DESTDIR=$(CURDIR)/dist/deb PREFIX=/usr
	install -D -m 0644 $(DEBIAN_SRC)/copyright dist/deb/usr/share/doc/fts-tokend/copyright
	# A native package (no Debian revision in VERSION): the changelog is changelog.gz.
	gzip -9n -c $(DEBIAN_SRC)/changelog > dist/deb/usr/share/doc/fts-tokend/changelog.gz
	install -D -m 0644 $(DEBIAN_SRC)/lintian-overrides dist/deb/usr/share/lintian/overrides/fts-tokend
	mkdir -p dist/deb/DEBIAN dist/shlibdeps/debian
	echo /etc/fts-tokend/config.json > dist/deb/DEBIAN/conffiles
	# dpkg-shlibdeps wants a source package's debian/control: a minimal one in a scratch folder.
	printf 'Source: fts-tokend\n\nPackage: fts-tokend\nArchitecture: amd64\n' > dist/shlibdeps/debian/control
	depends=$$(cd dist/shlibdeps && dpkg-shlibdeps -O -e$(CURDIR)/dist/deb/usr/bin/fts-tokend | sed -n 's/^shlibs:Depends=//p'); \
	  [ -n "$$depends" ] || { echo "dpkg-shlibdeps found no dependency" >&2; exit 1; }; \
	  sed 's/@VERSION@/$(VERSION)/; s/@SIZE@/'"$$(du -sk --exclude=DEBIAN dist/deb | cut -f1)"'/; s/@DEPENDS@/'"$$depends"'/' \
	    $(DEBIAN_SRC)/control > dist/deb/DEBIAN/control
	install -m 0755 $(DEBIAN_SRC)/postinst $(DEBIAN_SRC)/prerm $(DEBIAN_SRC)/postrm dist/deb/DEBIAN/
	cd dist/deb && find . -path ./DEBIAN -prune -o -type f ! -path ./etc/fts-tokend/config.json -printf '%P\0' | sort -z | xargs -0 md5sum > DEBIAN/md5sums
	dpkg-deb --root-owner-group --build dist/deb $(DEB)
	@grep '^Depends:' dist/deb/DEBIAN/control
	@ls -l $(DEB)

## test-system: the .deb installed into a real systemd 252 (../shared/systemd-lab; needs root)
test-system: deb
	bash Tests/System/package-checks.sh $(DEB)
	bash Tests/System/run.sh $(DEB)

## bench: release binary against nginx and the floor; writes docs/benchmarks.md (BENCH_FLAGS for bench.py;
## about 25 minutes: 10 of idle measurement, 10 of clean builds)
BENCH_FLAGS ?= --build-cost
bench: release dist/uds-load dist/read-floor
	@command -v nginx >/dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq nginx-light; }
	python3 bench/bench.py --binary $(RELEASE_BIN) --load dist/uds-load --floor dist/read-floor $(BENCH_FLAGS)

## soak: the long chaos suite (SOAK_SECONDS of random faults, 250 kill -9, 10x the lifetimes) and the
## fuzzers (FUZZ_SECONDS each); every scenario line goes to dist/soak.txt. Disk faults need root.
SOAK_SECONDS ?= 1800
FUZZ_SECONDS ?= 300
CHAOS_SUITES := IntegrationTests\.(AuthServerChaosTests|ClockChaosTests|SoakTests|CrashSafetyTests|DiskFaultTests|SocketFloodTests|HostileAnswerTests|HostileSetupTests)
soak: deps
	$(SWIFT) build --build-tests
	mkdir -p dist
	set -o pipefail; FTS_CHAOS=long FTS_SOAK_SECONDS=$(SOAK_SECONDS) FTS_CRASH_KILLS=250 \
	  $(SWIFT) test --skip-build --filter '$(CHAOS_SUITES)' 2>&1 | tee dist/soak.log
	set -o pipefail; bash Fuzz/run.sh $(FUZZ_SECONDS) 2>&1 | tee -a dist/soak.log
	grep '^scenario: ' dist/soak.log > dist/soak.txt; cat dist/soak.txt

## bench-instructions: instructions the daemon executes per proxied request (callgrind; a figure that
## repeats on a shared machine where requests per second do not); BENCH_BINARIES to compare several
BENCH_BINARIES ?= $(RELEASE_BIN)
bench-instructions: release dist/uds-load
	@command -v nginx >/dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq nginx-light; }
	@command -v valgrind >/dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq valgrind; }
	python3 bench/proxy-instructions.py $(foreach b,$(BENCH_BINARIES),--binary $(b)) --load dist/uds-load

## bench-smoke: one short round of every benchmark, to keep the script working (writes to dist/)
bench-smoke: BENCH_FLAGS = --smoke --output dist/benchmarks-smoke.md
bench-smoke: bench

dist/uds-load: bench/uds-load.c
	@mkdir -p dist
	$(CC) -O2 -pthread -Wall -o $@ $<

dist/read-floor: bench/read-floor.c
	@mkdir -p dist
	$(CC) -O2 -pthread -Wall -o $@ $<

clean:
	rm -rf .build dist
