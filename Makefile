# autoattach: build, install and package the USB qube (sys-usb) side.
#
#   make                                   cargo build --release
#   make static                            a static binary (musl): one file for any template
#   make install DESTDIR=/tmp/x PREFIX=/usr install into a staging root
#   make deb rpm                           target/pkg/autoattach_*.deb, autoattach-*.rpm
#   make check-packaging                   packaging/test.sh (unit, score, packages)
#   make check-sandbox                     the unit run for real under a throwaway systemd
#                                          (root; packaging/sandbox-test.sh)
#
# Packages are built from the tree that `make install` stages, with plain tools
# (dpkg-deb, rpmbuild), so both hold the same files with the same modes.

PREFIX      ?= /usr
BINDIR      ?= $(PREFIX)/bin
UNITDIR     ?= $(PREFIX)/lib/systemd/system
PRESETDIR   ?= $(PREFIX)/lib/systemd/system-preset
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
DOCDIR      ?= $(PREFIX)/share/doc/autoattach
DATADIR     ?= $(PREFIX)/share/autoattach
SYSCONFDIR  ?= /etc

CARGO ?= cargo
# The binary to install; override to package one built elsewhere.
BIN   ?= target/release/autoattach

# The dom0 side travels in the packages so a user can copy it to dom0 from the
# template (dom0/README.md says how, and expects these paths under $(DATADIR)/dom0).
# Every file listed here must exist, or install and the packages fail.
DOM0_DIR   ?= dom0
DOM0_FILES ?= README.md custom.USBDeviceAttach custom.USBDeviceDetach autoattach.conf \
              30-autoattach.policy policy-r4.0/custom.USBDeviceAttach \
              policy-r4.0/custom.USBDeviceDetach

# Optional top-level documents, installed when present.
DOCS ?= $(wildcard README.md LICENSE LICENSE.* COPYING)

VERSION := $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
PKGDIR  := target/pkg
STAGE   := $(PKGDIR)/root

.PHONY: all build static install check-dom0 stage deb rpm packages check-packaging check-sandbox \
	clean-packages print-dom0-files

all: build

build:
	$(CARGO) build --release

# A static binary (Rust's musl target, ~0.9 MiB): the same file runs in Debian and Fedora
# templates whatever their glibc. Package it with `make deb rpm BIN=$(STATIC_BIN)`.
# Needs the target once: rustup target add x86_64-unknown-linux-musl
STATIC_BIN := target/x86_64-unknown-linux-musl/release/autoattach
static:
	$(CARGO) build --release --target x86_64-unknown-linux-musl

# Built only when missing: `make install` must not rebuild as root what a user built.
target/release/autoattach:
	$(CARGO) build --release

check-dom0:
	@missing=; \
	for f in $(DOM0_FILES); do \
		[ -e "$(DOM0_DIR)/$$f" ] || missing="$$missing $$f"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "error: dom0 file(s) missing from $(DOM0_DIR)/:$$missing" >&2; \
		echo "       the packages carry the dom0 side; add the file(s), or fix DOM0_FILES in the Makefile" >&2; \
		exit 1; \
	fi

# dom0 files: symlinks stay symlinks, scripts keep 0755, the rest is 0644; SHA256SUMS
# lets the user check a copy made into dom0.
install: check-dom0 $(BIN)
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PRESETDIR) \
		$(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(SYSCONFDIR)/autoattach \
		$(DESTDIR)$(SYSCONFDIR)/autoattach/rules.d $(DESTDIR)$(DOCDIR) \
		$(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DATADIR) $(DESTDIR)$(DATADIR)/dom0
	install -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/autoattach
	sed 's|/usr/bin/autoattach|$(BINDIR)/autoattach|' packaging/autoattach.service \
		> $(DESTDIR)$(UNITDIR)/autoattach.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/autoattach.service
	install -m 0644 packaging/50-autoattach.preset $(DESTDIR)$(PRESETDIR)/50-autoattach.preset
	install -m 0644 packaging/autoattach.sysusers $(DESTDIR)$(SYSUSERSDIR)/autoattach.conf
	install -m 0644 packaging/rules.d-README $(DESTDIR)$(SYSCONFDIR)/autoattach/rules.d/README
	install -m 0644 packaging/README.md $(DESTDIR)$(DOCDIR)/README.packaging.md
	install -m 0644 packaging/minimal/README.md $(DESTDIR)$(DOCDIR)/README.minimal-templates.md
	install -m 0644 packaging/examples/*.rules $(DESTDIR)$(DOCDIR)/examples/
	for f in $(DOCS); do install -m 0644 "$$f" $(DESTDIR)$(DOCDIR)/; done
	for f in $(DOM0_FILES); do \
		src="$(DOM0_DIR)/$$f"; dst="$(DESTDIR)$(DATADIR)/dom0/$$f"; \
		install -d -m 0755 "$$(dirname "$$dst")" || exit 1; \
		if [ -L "$$src" ]; then cp -P "$$src" "$$dst"; \
		elif [ -x "$$src" ]; then install -m 0755 "$$src" "$$dst"; \
		else install -m 0644 "$$src" "$$dst"; fi || exit 1; \
	done
	cd $(DESTDIR)$(DATADIR)/dom0 && sha256sum $(DOM0_FILES) > SHA256SUMS && chmod 0644 SHA256SUMS

# A fresh staging root for both packages.
stage: check-dom0 $(BIN)
	rm -rf $(STAGE)
	umask 022 && $(MAKE) --no-print-directory install DESTDIR=$(abspath $(STAGE)) \
		PREFIX=/usr SYSCONFDIR=/etc BIN=$(BIN)

deb: stage
	packaging/build-deb.sh $(STAGE) $(PKGDIR) $(VERSION)

rpm: stage
	packaging/build-rpm.sh $(STAGE) $(PKGDIR) $(VERSION)

packages: deb rpm

check-packaging:
	packaging/test.sh

check-sandbox: stage
	packaging/sandbox-test.sh $(STAGE)

clean-packages:
	rm -rf $(PKGDIR)

# For packaging/test.sh.
print-dom0-files:
	@echo $(DOM0_FILES)
