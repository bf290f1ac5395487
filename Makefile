# autoattach: build, install and package the USB qube (sys-usb) side and the dom0 side.
#
#   make                                   cargo build --release (this machine's glibc)
#   make static                            the static musl binary the packages ship
#   make man                               the man pages (man/*.scd, scdoc) into target/man
#   make install DESTDIR=/tmp/x PREFIX=/usr install into a staging root
#   make deb rpm                           target/pkg/autoattach_*.deb, autoattach-*.rpm (templates)
#   make dom0-rpm                          target/pkg/autoattach-dom0-*.noarch.rpm (dom0, R4.2/R4.3)
#   make packages                          all three
#   make check-prereqs                     say which build tools are missing, and how to get them
#   make check-packaging                   packaging/test.sh (unit, score, packages, lintian, rpmlint,
#                                          man pages, Salt formula)
#   make check-sandbox                     the unit run for real under a throwaway systemd
#                                          (root; packaging/sandbox-test.sh)
#
# Packages are built from the tree that `make install` stages, with plain tools (dpkg-deb,
# rpmbuild), so the .deb and the .rpm hold the same files with the same modes; only the zsh
# completion directory differs (each distribution's own). packaging/README.md explains the
# choices, the prerequisites and the linters' verdicts.

PREFIX      ?= /usr
BINDIR      ?= $(PREFIX)/bin
UNITDIR     ?= $(PREFIX)/lib/systemd/system
PRESETDIR   ?= $(PREFIX)/lib/systemd/system-preset
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
DOCDIR      ?= $(PREFIX)/share/doc/autoattach
DATADIR     ?= $(PREFIX)/share/autoattach
MANDIR      ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
# Debian: vendor-completions (zsh's Debian $fpath); Fedora: site-functions.
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/vendor-completions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
SYSCONFDIR  ?= /etc

CARGO ?= cargo
# Rust 1.85 is the first with edition 2024 (Cargo.toml: rust-version).
RUST_MIN := 1.85
MUSL_TARGET := x86_64-unknown-linux-musl
# BIN: the binary `make install` installs (by default this machine's glibc build). PKG_BIN: the
# binary the packages carry (stage-deb/stage-rpm install it as BIN), by default the static musl
# build: one file for Debian and Fedora templates whatever their C library, with the smaller
# idle memory (BENCHMARKS.md). Package another build with PKG_BIN=target/release/autoattach.
STATIC_BIN := target/$(MUSL_TARGET)/release/autoattach
BIN        ?= target/release/autoattach
PKG_BIN    ?= $(STATIC_BIN)
# The largest binary the packages may carry (issue 10: at most 1.5 MiB).
MAX_BIN_BYTES := 1572864

# The dom0 side travels in the template packages so a user can copy it to dom0 from the
# template (dom0/README.md says how, and expects these paths under $(DATADIR)/dom0), and
# is packaged on its own as autoattach-dom0. Every file listed here must exist.
DOM0_DIR   ?= dom0
DOM0_FILES ?= README.md custom.USBDeviceAttach custom.USBDeviceDetach autoattach.conf \
              30-autoattach.policy

# Man pages and shell completions, from the CLI side (man/, completions/): `make man`
# builds the pages from man/*.scd (scdoc) into $(MAN_OUT). Each file listed here must
# exist before install; the packages build them first.
MAN_OUT          ?= target/man
MAN_PAGES        ?= $(MAN_OUT)/autoattach.8 $(MAN_OUT)/autoattach.rules.5
DOM0_MAN_PAGES   ?= $(MAN_OUT)/autoattach-dom0.8
BASH_COMPLETION  ?= completions/autoattach.bash
ZSH_COMPLETION   ?= completions/_autoattach
FISH_COMPLETION  ?= completions/autoattach.fish

# Top-level documents installed in $(DOCDIR). LICENSE is not among them: the .deb carries
# debian/copyright (which points to /usr/share/common-licenses/GPL-2), the rpm %license.
DOCS ?= README.md

VERSION := $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
# The packages' revision: the top entry of packaging/debian/changelog must be $(VERSION)-1.
PKG_RELEASE := 1
PKGDIR  := target/pkg
# Homepage: none yet (packaging/README.md). Set HOMEPAGE=https://... to fill the .deb's
# Homepage: field and the rpm's URL: tag.
HOMEPAGE ?=

.PHONY: all build static man install check-dom0 check-docs check-prereqs check-rust check-musl \
	check-man-tools \
	check-deb-tools check-rpm-tools check-changelog stage-deb stage-rpm deb rpm dom0-rpm \
	packages check-packaging check-sandbox clean-packages print-dom0-files

all: build

# --- prerequisites: say what is missing, never a bare "Error 127" ----------------------
# need TOOL DEBIAN-PACKAGE FEDORA-PACKAGE WHAT-FOR
need = command -v $(1) >/dev/null 2>&1 || { \
	echo "error: $(1) not found: it is needed $(4)." >&2; \
	echo "       Debian: apt-get install $(2)    Fedora: dnf install $(3)" >&2; exit 1; }

check-rust:
	@command -v $(CARGO) >/dev/null 2>&1 && command -v rustc >/dev/null 2>&1 || { \
		echo "error: cargo/rustc not found: autoattach needs Rust $(RUST_MIN) or later (edition 2024)." >&2; \
		echo "       Install rustup (https://rustup.rs; Debian 13: apt-get install rustup), then: rustup default stable" >&2; \
		exit 1; }
	@v=$$(rustc --version | sed -n 's/^rustc \([0-9]*\.[0-9]*\).*/\1/p'); \
	if [ -z "$$v" ] || [ "$$(printf '%s\n%s\n' "$(RUST_MIN)" "$$v" | sort -V | head -n 1)" != "$(RUST_MIN)" ]; then \
		echo "error: rustc $$v is too old: autoattach uses edition 2024, which needs Rust $(RUST_MIN) or later." >&2; \
		echo "       Debian 12's rustc is 1.63. Install rustup (https://rustup.rs), then: rustup default stable" >&2; \
		exit 1; \
	fi
	@$(call need,cc,build-essential,gcc,to link Rust programs)

check-musl: check-rust
	@rustup target list --installed 2>/dev/null | grep -qx $(MUSL_TARGET) || { \
		echo "error: the Rust target $(MUSL_TARGET) is not installed: the packages ship the static musl build." >&2; \
		echo "       Install it with: rustup target add $(MUSL_TARGET)" >&2; \
		echo "       (or package the glibc build: make deb rpm PKG_BIN=target/release/autoattach)" >&2; \
		exit 1; }

check-deb-tools:
	@$(call need,dpkg-deb,dpkg,dpkg,to build the .deb)
	@$(call need,dpkg-parsechangelog,dpkg-dev,dpkg-dev,to read packaging/debian/changelog)
	@$(call need,gzip,gzip,gzip,to compress man pages and the changelog)

check-rpm-tools:
	@$(call need,rpmbuild,rpm,rpm-build,to build the rpms)
	@$(call need,dpkg-parsechangelog,dpkg-dev,dpkg-dev,to read packaging/debian/changelog (the rpm %changelog is made from it))
	@$(call need,gzip,gzip,gzip,to compress man pages)

check-man-tools:
	@[ -f man/Makefile ] || { \
		echo "error: man/Makefile missing: the man page sources (man/*.scd) come with the CLI side" >&2; exit 1; }
	@$(call need,scdoc,scdoc,scdoc,to build the man pages from man/*.scd)

check-prereqs:
	@ok=1; \
	$(MAKE) --no-print-directory -s check-musl || ok=; \
	$(MAKE) --no-print-directory -s check-man-tools || ok=; \
	$(MAKE) --no-print-directory -s check-deb-tools || ok=; \
	$(MAKE) --no-print-directory -s check-rpm-tools || ok=; \
	[ -n "$$ok" ] && echo "all build prerequisites are present"

check-changelog:
	@top=$$(dpkg-parsechangelog -l packaging/debian/changelog -S Version); \
	[ "$$top" = "$(VERSION)-$(PKG_RELEASE)" ] || { \
		echo "error: packaging/debian/changelog starts at $$top, but Cargo.toml says $(VERSION):" >&2; \
		echo "       add an entry for $(VERSION)-$(PKG_RELEASE) (dch -v $(VERSION)-$(PKG_RELEASE), or by hand)" >&2; \
		exit 1; }

# --- build ---------------------------------------------------------------------------
# The man pages: man/Makefile (the CLI side's) renders them with scdoc.
man: check-man-tools
	$(MAKE) --no-print-directory -C man OUT=$(abspath $(MAN_OUT))

build: check-rust
	$(CARGO) build --release

# The static musl binary (Rust's own target, self-contained: no musl-tools needed).
static: check-musl
	$(CARGO) build --release --target $(MUSL_TARGET)

# Built only when missing: `make install` must not rebuild as root what a user built.
target/release/autoattach:
	$(MAKE) --no-print-directory build

$(STATIC_BIN):
	$(MAKE) --no-print-directory static

# --- install -------------------------------------------------------------------------
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

check-docs:
	@missing=; \
	for f in $(MAN_PAGES) $(DOM0_MAN_PAGES) $(BASH_COMPLETION) $(ZSH_COMPLETION) $(FISH_COMPLETION); do \
		[ -s "$$f" ] || missing="$$missing $$f"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "error: man page(s) or shell completion(s) missing:$$missing" >&2; \
		echo "       build the man pages with \`make man\` (sources in man/); completions are in completions/" >&2; \
		exit 1; \
	fi

# dom0 files: symlinks stay symlinks, scripts keep 0755, the rest is 0644; SHA256SUMS
# lets the user check a copy made into dom0. The Salt formula (salt/) goes in
# $(DATADIR)/salt laid out as dom0's /srv (user_salt, user_pillar), with its own SHA256SUMS.
# Man pages are installed compressed (gzip -n: no name or time stamp, so the packages are
# reproducible).
install: check-dom0 check-docs $(BIN)
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PRESETDIR) \
		$(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(SYSCONFDIR)/autoattach \
		$(DESTDIR)$(SYSCONFDIR)/autoattach/rules.d $(DESTDIR)$(DOCDIR) \
		$(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DATADIR) $(DESTDIR)$(DATADIR)/dom0 \
		$(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(BASHCOMPDIR) \
		$(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
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
	for f in $(MAN_PAGES) $(DOM0_MAN_PAGES); do \
		n=$$(basename "$$f"); s=$${n##*.}; \
		gzip -9n <"$$f" >$(DESTDIR)$(MANDIR)/man$$s/$$n.gz && chmod 0644 $(DESTDIR)$(MANDIR)/man$$s/$$n.gz || exit 1; \
	done
	install -m 0644 $(BASH_COMPLETION) $(DESTDIR)$(BASHCOMPDIR)/autoattach
	install -m 0644 $(ZSH_COMPLETION) $(DESTDIR)$(ZSHCOMPDIR)/_autoattach
	install -m 0644 $(FISH_COMPLETION) $(DESTDIR)$(FISHCOMPDIR)/autoattach.fish
	for f in $(DOM0_FILES); do \
		src="$(DOM0_DIR)/$$f"; dst="$(DESTDIR)$(DATADIR)/dom0/$$f"; \
		install -d -m 0755 "$$(dirname "$$dst")" || exit 1; \
		if [ -L "$$src" ]; then cp -P "$$src" "$$dst"; \
		elif [ -x "$$src" ]; then install -m 0755 "$$src" "$$dst"; \
		else install -m 0644 "$$src" "$$dst"; fi || exit 1; \
	done
	cd $(DESTDIR)$(DATADIR)/dom0 && sha256sum $(DOM0_FILES) > SHA256SUMS && chmod 0644 SHA256SUMS
	install -d -m 0755 $(DESTDIR)$(DATADIR)/salt/user_salt/autoattach $(DESTDIR)$(DATADIR)/salt/user_pillar/autoattach
	install -m 0644 salt/autoattach/*.sls salt/autoattach/*.jinja $(DESTDIR)$(DATADIR)/salt/user_salt/autoattach/
	install -m 0644 salt/autoattach.top $(DESTDIR)$(DATADIR)/salt/user_salt/autoattach.top
	install -m 0644 salt/pillar/autoattach.top $(DESTDIR)$(DATADIR)/salt/user_pillar/autoattach.top
	install -m 0644 salt/pillar/autoattach/init.sls $(DESTDIR)$(DATADIR)/salt/user_pillar/autoattach/init.sls
	install -m 0644 salt/README.md $(DESTDIR)$(DATADIR)/salt/README.md
	cd $(DESTDIR)$(DATADIR)/salt && find user_salt user_pillar README.md -type f | LC_ALL=C sort | \
		xargs sha256sum > SHA256SUMS && chmod 0644 SHA256SUMS

# --- packages ------------------------------------------------------------------------
# A fresh staging root per package format (they differ in the zsh completion directory).
# The static binary is brought up to date first (cargo does nothing when it is), so a
# package never carries a stale build; then checked: no larger than the packages may carry.
PKG_BIN_DEP := $(if $(filter $(STATIC_BIN),$(PKG_BIN)),static,$(PKG_BIN))
stage-deb stage-rpm: stage-%: man check-dom0 check-docs check-changelog $(PKG_BIN_DEP)
	@size=$$(stat -c %s $(PKG_BIN)); [ "$$size" -le $(MAX_BIN_BYTES) ] || { \
		echo "error: $(PKG_BIN) is $$size bytes, more than the $(MAX_BIN_BYTES) the packages may carry" >&2; exit 1; }
	rm -rf $(PKGDIR)/$*-root
	umask 022 && $(MAKE) --no-print-directory install DESTDIR=$(abspath $(PKGDIR)/$*-root) \
		PREFIX=/usr SYSCONFDIR=/etc BIN=$(PKG_BIN) \
		$(if $(filter rpm,$*),ZSHCOMPDIR=/usr/share/zsh/site-functions)

deb: check-deb-tools stage-deb
	HOMEPAGE='$(HOMEPAGE)' packaging/build-deb.sh $(PKGDIR)/deb-root $(PKGDIR) $(VERSION)-$(PKG_RELEASE)

rpm: check-rpm-tools stage-rpm
	HOMEPAGE='$(HOMEPAGE)' packaging/build-rpm.sh autoattach $(PKGDIR)/rpm-root $(PKGDIR) $(VERSION)

# The dom0 package: noarch, for the dom0 of R4.2 (Fedora 37) and R4.3 (Fedora 41). Its
# tree: the handler under both service names, the policy, the allowlist (a config file
# rpm keeps when edited), the dom0 man page and README.
DOM0_STAGE := $(PKGDIR)/dom0-root
dom0-rpm: check-rpm-tools man check-dom0 check-docs check-changelog
	rm -rf $(DOM0_STAGE)
	umask 022 && install -d -m 0755 $(DOM0_STAGE)/etc/qubes-rpc $(DOM0_STAGE)/etc/qubes/policy.d \
		$(DOM0_STAGE)/usr/share/doc/autoattach-dom0 $(DOM0_STAGE)$(MANDIR)/man8
	install -m 0755 $(DOM0_DIR)/custom.USBDeviceAttach $(DOM0_STAGE)/etc/qubes-rpc/custom.USBDeviceAttach
	ln -s custom.USBDeviceAttach $(DOM0_STAGE)/etc/qubes-rpc/custom.USBDeviceDetach
	install -m 0644 $(DOM0_DIR)/30-autoattach.policy $(DOM0_STAGE)/etc/qubes/policy.d/30-autoattach.policy
	install -m 0644 $(DOM0_DIR)/autoattach.conf $(DOM0_STAGE)/etc/qubes/autoattach.conf
	install -m 0644 $(DOM0_DIR)/README.md $(DOM0_STAGE)/usr/share/doc/autoattach-dom0/README.md
	for f in $(DOM0_MAN_PAGES); do \
		n=$$(basename "$$f"); gzip -9n <"$$f" >$(DOM0_STAGE)$(MANDIR)/man8/$$n.gz && \
		chmod 0644 $(DOM0_STAGE)$(MANDIR)/man8/$$n.gz || exit 1; \
	done
	HOMEPAGE='$(HOMEPAGE)' packaging/build-rpm.sh autoattach-dom0 $(DOM0_STAGE) $(PKGDIR) $(VERSION)

packages: deb rpm dom0-rpm

check-packaging:
	packaging/test.sh

check-sandbox: stage-deb
	packaging/sandbox-test.sh $(PKGDIR)/deb-root

clean-packages:
	rm -rf $(PKGDIR)

# For packaging/test.sh.
print-dom0-files:
	@echo $(DOM0_FILES)
