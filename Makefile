# imdsd — node-local IMDS-compatible token sidecar.
# make            build build/imdsd (release); names the missing Debian packages if any
# make demo       install dependencies, run the daemon against a local stand-in Entra, fetch a token
# make check      install dependencies, then unit + integration tests, plain, ASan/UBSan and valgrind
#                 (and the arm64 image's binary under qemu-aarch64-static)
# make check-full the same with every integration module under valgrind, and make check-systemd
#                 (before a release)
# make check-systemd  make install into a Debian 12 root booted under a real systemd (nspawn), the
#                 quick start, reload, watchdog, socket activation, SupplementaryGroups=, security
# make bench      install dependencies, then imdsd against nginx (tests/bench/README.md)
# make image      install dependencies (the arm64 cross toolchain too), build the container image for
#                 linux/amd64 and linux/arm64: one OCI image index, build/imdsd-VERSION.oci.tar
# make deps       install the Debian packages the build and the tests need
# make deps-arm64 install the arm64 cross toolchain and libraries (make image and make check do)
# make install    build/imdsd, the systemd units and imdsd(8) under PREFIX (/usr/local); DESTDIR too
#
# demo, check, check-full and bench install packages first and then build in a new make: a make
# that started before the packages were there would not see files that appeared since.

CC      ?= cc
V       ?= 0
Q        = $(if $(filter 1,$(V)),,@)

LLHTTP_SRC  ?= /usr/share/llhttp
LLHTTP_INC  ?= /usr/share/include/llhttp

WARN     = -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 -Wvla
CPPFLAGS = -Iinclude -isystem $(LLHTTP_INC) -D_DEFAULT_SOURCE -D_GNU_SOURCE
BASE     = -std=c11 -g -fno-omit-frame-pointer
LIBS     = -luv -lmbedtls -lmbedx509 -lmbedcrypto

# Variants: release (build/), asan (build/asan/), debug for valgrind (build/debug/).
REL_CFLAGS  = $(BASE) -O2 -fstack-protector-strong -D_FORTIFY_SOURCE=2 -fPIE
REL_LDFLAGS = -pie -Wl,-z,relro,-z,now
ASAN_CFLAGS = $(BASE) -O1 -fsanitize=address,undefined -fno-sanitize-recover=all
# Every variant binds its symbols at start-up. With lazy binding, the first call of each library
# function goes through glibc's resolver, which saves the whole vector register state (XSAVEC) on
# the stack: registers that still hold the last bytes a memcpy moved, such as the tail of the
# service-account token in an Entra request, end up in stack memory nobody clears.
NOW_LDFLAGS = -Wl,-z,now
DBG_CFLAGS  = $(BASE) -O1

SRCS     := $(wildcard daemon/*.c)
LIB_SRCS := $(filter-out daemon/main.c,$(SRCS))
LLHTTP_SRCS = $(LLHTTP_SRC)/api.c $(LLHTTP_SRC)/http.c $(LLHTTP_SRC)/llhttp.c
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
# test_buf searches every block freed for what the buffers held
UNIT_LDFLAGS_test_buf = -Wl,--wrap=free,--wrap=realloc
# test_arc sets the monotonic clock (keys expire by it) and the wall clock (to show they do not),
# and refuses netlink sockets (a service without AF_NETLINK)
UNIT_LDFLAGS_test_arc = -Wl,--wrap=now_ms,--wrap=now_wall_ms,--wrap=socket
# test_secret_watch sets both clocks, the monotonic one and the wall clock
UNIT_LDFLAGS_test_secret_watch = -Wl,--wrap=now_ms,--wrap=now_wall_ms
# test_token_cache sets both clocks: the cache measures on the monotonic one, the wall clock only
# dates what clients are told
UNIT_LDFLAGS_test_token_cache = -Wl,--wrap=now_ms,--wrap=now_wall_ms

# Anything that compiles first checks the build packages, and names the missing ones in one line
# (demo, check, check-full and bench install them first, then build in a new make).
ifeq ($(filter deps deps-arm64 demo check check-full bench image clean uninstall,$(MAKECMDGOALS)),)
MISSING_PKGS := $(shell tests/deps.sh --check-build 2>&1)
ifneq ($(MISSING_PKGS),)
$(error $(MISSING_PKGS))
endif
endif

VERSION := $(shell cat VERSION 2>/dev/null || echo 0.0.0)
CPPFLAGS += -DIMDSD_VERSION='"$(VERSION)"'

all: build/imdsd

# ---- generic per-variant rules -------------------------------------------------------------
define variant
$(1)_OBJS   := $$(patsubst daemon/%.c,$(2)/obj/%.o,$$(LIB_SRCS))
$(1)_LLHTTP := $(2)/obj/llhttp_api.o $(2)/obj/llhttp_http.o $(2)/obj/llhttp_llhttp.o

$(2)/obj/%.o: daemon/%.c
	@mkdir -p $$(@D)
	$$(if $$(Q),@echo "  CC      $$@")
	$(Q)$$(CC) $$(CPPFLAGS) $(3) $$(WARN) -MMD -MP -c -o $$@ $$<

# llhttp's sources come from a package: no prerequisite on them, which would turn a missing
# package into "no rule to make target" (they change only with the package)
$(2)/obj/llhttp_%.o:
	@mkdir -p $$(@D)
	$$(if $$(Q),@echo "  CC      $$@")
	$(Q)$$(CC) $$(CPPFLAGS) $(3) -w -c -o $$@ $$(LLHTTP_SRC)/$$*.c

$(2)/libimdsd.a: $$($(1)_OBJS) $$($(1)_LLHTTP)
	$(Q)rm -f $$@ && $$(AR) rcs $$@ $$^

$(2)/imdsd: $(2)/obj/main.o $(2)/libimdsd.a
	$$(if $$(Q),@echo "  LD      $$@")
	$(Q)$$(CC) $(3) $(4) -o $$@ $$^ $$(LIBS)

$(2)/unit/%: tests/unit/%.c $(2)/libimdsd.a $(wildcard tests/unit/*.h include/*.h)
	@mkdir -p $$(@D)
	$$(if $$(Q),@echo "  CC      $$@")
	$(Q)$$(CC) $$(CPPFLAGS) $(3) $$(WARN) -Wno-missing-prototypes -o $$@ $$< $(2)/libimdsd.a $$(LIBS) -lcmocka $$(UNIT_LDFLAGS_$$*)

$(1)_UNITS := $$(patsubst tests/unit/%.c,$(2)/unit/%,$$(UNIT_SRCS))
-include $$(wildcard $(2)/obj/*.d)
endef

$(eval $(call variant,REL,build,$(REL_CFLAGS),$(REL_LDFLAGS)))
$(eval $(call variant,ASAN,build/asan,$(ASAN_CFLAGS),$(NOW_LDFLAGS)))
$(eval $(call variant,DBG,build/debug,$(DBG_CFLAGS),$(NOW_LDFLAGS)))

# The image's binary: static-pie (the image has no libc), hardened like the release build,
# stripped, and the same bytes from the same sources wherever the checkout is.
STATIC_CFLAGS  = -std=c11 -O2 -fstack-protector-strong -D_FORTIFY_SOURCE=2 -fPIE -ffile-prefix-map=$(CURDIR)/=
STATIC_LDFLAGS = -static-pie -s -Wl,-z,relro,-z,now
$(eval $(call variant,STATIC,build/static,$(STATIC_CFLAGS),$(STATIC_LDFLAGS)))
# libuv1-dev's static library; glibc's static getaddrinfo reads /etc/hosts and /etc/resolv.conf
# itself (its link-time warning is about other NSS services, which the image does not use)
build/static/imdsd: LIBS = /usr/lib/x86_64-linux-gnu/libuv_a.a -lmbedtls -lmbedx509 -lmbedcrypto -lpthread -ldl

# The same for arm64 nodes (build/arm64/imdsd): Debian's cross compiler and the arm64 libraries
# through dpkg multiarch (libc6-dev, libuv1-dev, libmbedtls-dev :arm64), installed by make image
# and make check (tests/deps.sh --arm64), not by make deps: an amd64-only build never needs them.
# The arm64 libc is libc6-dev:arm64, the same glibc version as the amd64 image's (dpkg keeps
# Multi-Arch: same packages in step), not the cross toolchain's older libc6-dev-arm64-cross.
ARM64_CC  ?= aarch64-linux-gnu-gcc
ARM64_LIB  = /usr/lib/aarch64-linux-gnu
$(eval $(call variant,ARM64,build/arm64,$(STATIC_CFLAGS),$(STATIC_LDFLAGS)))
build/arm64/%: CC = $(ARM64_CC)
build/arm64/%: AR = aarch64-linux-gnu-ar
build/arm64/imdsd: LIBS = $(ARM64_LIB)/libuv_a.a -lmbedtls -lmbedx509 -lmbedcrypto -lpthread -ldl

# libFuzzer targets link only the pure modules (no loop, no sockets).
FUZZ_CFLAGS = -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_LIBSRC = daemon/buf.c daemon/json.c daemon/log.c daemon/form.c daemon/imds.c daemon/entra_msg.c daemon/jwt.c daemon/util.c
FUZZ_TARGETS = $(patsubst tests/fuzz/%.c,build/fuzz/%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_SECONDS ?= 10

build/fuzz/%: tests/fuzz/%.c $(FUZZ_LIBSRC) $(wildcard include/*.h)
	@mkdir -p $(@D)
	$(if $(Q),@echo "  CLANG   $@")
	$(Q)clang $(CPPFLAGS) $(FUZZ_CFLAGS) -Wall -Wextra -Werror -o $@ $< $(FUZZ_LIBSRC) $(FUZZ_EXTRA_$*) -lmbedcrypto $(FUZZ_LIBS_$*)

# fuzz_http: the request path as wired, through a socket and the loop
FUZZ_EXTRA_fuzz_http = daemon/http_server.c daemon/endpoints.c daemon/token_cache.c daemon/refresh.c daemon/metrics.c daemon/metrics_render.c build/fuzz/libllhttp.a
FUZZ_LIBS_fuzz_http = -luv
build/fuzz/fuzz_http: $(FUZZ_EXTRA_fuzz_http)
build/fuzz/libllhttp.a:
	@mkdir -p $(@D)/llhttp
	$(Q)for f in api http llhttp; do \
	    clang $(CPPFLAGS) -g -O1 -fsanitize=fuzzer-no-link,address,undefined -w -c -o $(@D)/llhttp/$$f.o $(LLHTTP_SRC)/$$f.c || exit 1; done
	$(Q)ar rcs $@ $(@D)/llhttp/*.o

# fuzz_config: config.c and the proxy URL parser it calls; fuzz_proxy: proxy.c and the parser of
# the proxy's answer to CONNECT (llhttp)
FUZZ_EXTRA_fuzz_config = daemon/config.c daemon/proxy.c
build/fuzz/fuzz_config: $(FUZZ_EXTRA_fuzz_config)
FUZZ_EXTRA_fuzz_proxy = daemon/proxy.c daemon/proxy_answer.c build/fuzz/libllhttp.a
build/fuzz/fuzz_proxy: $(FUZZ_EXTRA_fuzz_proxy)

fuzz: $(FUZZ_TARGETS)

# Replays each seed corpus, then fuzzes each target for FUZZ_SECONDS (kept short in make check).
fuzz-smoke: $(FUZZ_TARGETS)
	$(Q)tests/fuzz/smoke.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

units: $(REL_UNITS)
units-asan: $(ASAN_UNITS)
units-debug: $(DBG_UNITS)

# ---- tests -------------------------------------------------------------------------------
PY ?= /usr/bin/python3

unit: build/imdsd units units-asan units-debug
	$(Q)tests/run-unit.sh build build/asan build/debug

# The integration suite (pytest, tests/integration/conftest.py). One variant or a selection:
#   make integration VARIANTS=asan PYTEST_ARGS='-k pipelin -x'
VARIANTS    ?= plain,asan,valgrind
PYTEST_ARGS ?=
JOBS        := $(shell nproc 2>/dev/null || echo 2)
integration: build/imdsd build/asan/imdsd build/debug/imdsd image-build build/go_adal_client
	$(Q)$(PY) -m pytest tests/integration -n $$(( $(JOBS) * 2 )) --variants $(VARIANTS) $(PYTEST_ARGS)

# go-autorest's adal asking 169.254.169.254 for tokens (test_proxy_dropin.py): Debian's Go and its
# golang-github-azure-go-autorest-dev, offline, in GOPATH mode
GO_ENV = GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$(CURDIR)/build/gocache GOFLAGS=
build/go_adal_client: tests/compat/go_adal_client.go
	@mkdir -p $(@D)
	$(if $(Q),@echo "  GO      $@")
	$(Q)$(GO_ENV) go build -o $@ $<

# everything make check runs, built in one parallel make
check-build: build/imdsd build/asan/imdsd build/debug/imdsd units units-asan units-debug fuzz build/loadgen image-build build/go_adal_client

check:
	$(Q)$(MAKE) --no-print-directory deps
	$(Q)tests/deps.sh --arm64-test
	$(Q)$(MAKE) --no-print-directory -j$(JOBS) check-build
	$(Q)tests/check.sh

check-full:
	$(Q)$(MAKE) --no-print-directory deps
	$(Q)tests/deps.sh --arm64-test
	$(Q)$(MAKE) --no-print-directory -j$(JOBS) check-build
	$(Q)tests/check.sh --full

# imdsd under a real systemd as PID 1 (tests/check_systemd.py): a debootstrap'd Debian 12 root
# (cached in /var/tmp/imdsd-nspawn-cache; about a minute to build, once) booted by systemd-nspawn,
# make install DESTDIR= into it, then the systemd quick start of docs/deployment.md; about 15 s.
# Skips (exit 0) where debootstrap cannot reach a mirror. Ends with "check-systemd: N passed, N failed".
check-systemd: build/imdsd build/imdsd.8
	$(Q)$(PY) tests/check_systemd.py

demo:
	$(Q)$(MAKE) --no-print-directory deps
	$(Q)$(MAKE) --no-print-directory -j$(JOBS) build/imdsd
	$(Q)$(PY) tests/demo.py --binary build/imdsd

# imdsd against nginx on loopback, plus start-up, memory and cold-exchange costs (tests/bench/bench.py):
# a table on stdout, JSON in build/bench.json. BENCH_ROUNDS=5 BENCH_SECONDS=5 ... (see the script).
bench:
	$(Q)$(MAKE) --no-print-directory deps
	$(Q)$(MAKE) --no-print-directory -j$(JOBS) build/imdsd build/loadgen
	$(Q)$(PY) tests/bench/bench.py --binary build/imdsd

# A tiny run of the same (about 10 s); ends with "bench-smoke: N passed, N failed".
bench-smoke: build/imdsd build/loadgen
	$(Q)$(PY) tests/bench/bench.py --binary build/imdsd --smoke

# the bench's fixed-rate (open-loop) load generator: wrk2 is not packaged in Debian
build/loadgen: tests/bench/loadgen.c
	@mkdir -p $(@D)
	$(Q)$(CC) $(BASE) -O2 $(WARN) -o $@ $<

# A soak with faults (tests/integration/test_soak.py; the method: tests/bench/README.md): the release
# build under steady load for SOAK_SECONDS while the stand-in Entra fails a fifth of its answers and
# the token file rotates every 7 s. Prints a summary table (also in build/soak-plain.txt). make check
# runs the same module for 60 s. SOAK_SEED=N repeats a run's fault picks.
SOAK_SECONDS ?= 600
soak: build/imdsd
	$(Q)SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest tests/integration/test_soak.py --variants plain -s -q $(PYTEST_ARGS)

.PHONY: bench bench-smoke soak

# ---- make coverage: line coverage of daemon/ (llvm source-based coverage, tests/coverage.sh) ----
# Every unit test, and every fuzz target replaying its committed corpus tests/fuzz/corpus/NAME
# (linked with tests/fuzz/replay.c instead of libFuzzer), built with clang's instrumentation in
# build/cov/. Writes build/cov/report.txt (per file of daemon/), build/cov/html/index.html,
# build/cov/fuzz.txt (each fuzz target's corpus alone), then the pure modules' line coverage
# against COVERAGE_MIN. A report: it fails if a test fails, on a module below COVERAGE_MIN only
# with COVERAGE_STRICT=1 (make check runs it, not strict).
COVERAGE_PURE   ?= json form imds entra_msg jwt refresh proxy proxy_answer config
COVERAGE_MIN    ?= 90
COVERAGE_STRICT ?= 0
LLVM_PROFDATA   ?= $(shell clang -print-prog-name=llvm-profdata)
LLVM_COV        ?= $(shell clang -print-prog-name=llvm-cov)
COV_CFLAGS       = $(BASE) -O0 -fprofile-instr-generate -fcoverage-mapping
$(eval $(call variant,COV,build/cov,$(COV_CFLAGS),$(NOW_LDFLAGS)))
build/cov/%: override CC = clang
# A fuzz target as the fuzz section builds it: FUZZ_CFLAGS without the sanitizers, FUZZ_LIBSRC and
# FUZZ_EXTRA_<target>, FUZZ_LIBS_<target>; daemon/ sources as the objects the unit tests link, no
# build/fuzz/ libraries (sanitized; libimdsd.a has llhttp), from libimdsd.a whatever else it uses.
COV_FUZZ        := $(patsubst build/fuzz/%,build/cov/fuzz/%,$(FUZZ_TARGETS))
COV_FUZZ_CFLAGS  = $(filter-out -fsanitize% -fno-sanitize% -O%,$(FUZZ_CFLAGS)) $(COV_CFLAGS)
cov_fuzz_src     = $(filter-out build/fuzz/%,$(FUZZ_LIBSRC) $(FUZZ_EXTRA_$(1)))
cov_fuzz_lib     = $(patsubst daemon/%.c,build/cov/obj/%.o,$(call cov_fuzz_src,$(1)))
$(foreach t,$(COV_FUZZ),$(eval $(t): $(call cov_fuzz_lib,$(notdir $(t)))))

build/cov/fuzz/%: tests/fuzz/%.c tests/fuzz/replay.c build/cov/libimdsd.a \
                  $(wildcard include/*.h)
	@mkdir -p $(@D)
	$(if $(Q),@echo "  CLANG   $@")
	$(Q)clang $(CPPFLAGS) $(COV_FUZZ_CFLAGS) -Wall -Wextra -Werror -o $@ $< tests/fuzz/replay.c \
	    $(call cov_fuzz_lib,$*) build/cov/libimdsd.a $(LIBS) -lmbedcrypto $(FUZZ_LIBS_$*)

coverage: $(COV_UNITS) $(COV_FUZZ) $(COV_OBJS) build/cov/obj/main.o
	$(Q)LLVM_PROFDATA=$(LLVM_PROFDATA) LLVM_COV=$(LLVM_COV) COVERAGE_PURE="$(COVERAGE_PURE)" \
	    COVERAGE_MIN=$(COVERAGE_MIN) COVERAGE_STRICT=$(COVERAGE_STRICT) \
	    tests/coverage.sh "$(COV_UNITS)" "$(COV_FUZZ)" "$(COV_OBJS) build/cov/obj/main.o" "$(SRCS)"

.PHONY: coverage
# ---- end of make coverage ------------------------------------------------------------------------

# ---- the container image (container/Containerfile, podman) --------------------------------------
# make image: one OCI image index for linux/amd64 and linux/arm64, from the same commit, in podman's
# store as the manifest list localhost/imdsd:VERSION (its images localhost/imdsd:VERSION-amd64 and
# -arm64) and in build/imdsd-VERSION.oci.tar to push (skopeo copy --all, or podman manifest push --all).
#   make image IMAGE_SOURCE=https://git.example.com/platform/imdsd   sets the source label
#   make image IMAGE_ARCHS=amd64      an index of the amd64 image alone, without the cross toolchain
# The arm64 image's binary is cross-compiled (build/arm64/imdsd); a FROM scratch Containerfile has
# no RUN step, so podman build --platform linux/arm64 needs no emulation.
# podman runs with container/containers.conf (CONTAINERS_CONF), not the user's configuration.
IMAGE         ?= localhost/imdsd:$(VERSION)
IMAGE_ARCHS   ?= amd64 arm64
IMAGE_ARCHIVE  = build/imdsd-$(VERSION).oci.tar
IMAGE_BIN_amd64 = build/static/imdsd
IMAGE_BIN_arm64 = build/arm64/imdsd
# the repository users should read it from: a setting, not read from the checkout, so that every
# clone of a commit labels (and digests) the image the same way
IMAGE_SOURCE  ?= unknown
# the commit, with "-dirty" when the checkout has uncommitted changes to tracked files
REVISION      := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(shell git diff --quiet HEAD -- 2>/dev/null || echo -dirty)
PODMAN         = CONTAINERS_CONF=$(CURDIR)/container/containers.conf podman
CA_BUNDLE     ?= /etc/ssl/certs/ca-certificates.crt

# what builds the arm64 binary first checks for the cross packages, and names the missing ones
ifneq ($(filter arm64,$(IMAGE_ARCHS)),)
ifneq ($(filter image-build check-build integration build/arm64/% build/image/arm64/%,$(MAKECMDGOALS)),)
MISSING_ARM64 := $(shell tests/deps.sh --check-arm64 2>&1)
ifneq ($(MISSING_ARM64),)
$(error $(MISSING_ARM64))
endif
endif
endif

image:
	$(Q)$(MAKE) --no-print-directory deps
	$(Q)$(if $(filter arm64,$(IMAGE_ARCHS)),$(MAKE) --no-print-directory deps-arm64)
	$(Q)$(MAKE) --no-print-directory -j$(JOBS) image-build

# each architecture's root file system, in build/image/ARCH/rootfs (the build context is its parent);
# modes and directories set explicitly: the layer must not depend on the umask
define image_rootfs
build/image/$(1)/rootfs: $(IMAGE_BIN_$(1)) container/passwd container/group $$(CA_BUNDLE)
	$$(Q)rm -rf $$@ && install -d -m 0755 $$@ $$@/etc $$@/etc/ssl $$@/etc/ssl/certs
	$$(Q)install -m 0755 $(IMAGE_BIN_$(1)) $$@/imdsd
	$$(Q)ln -s imdsd $$@/proxy # the workload-identity webhook's postStart hook runs /proxy
	$$(Q)install -m 0644 $$(CA_BUNDLE) $$@/etc/ssl/certs/ca-certificates.crt
	$$(Q)install -m 0644 container/passwd $$@/etc/passwd
	$$(Q)install -m 0644 container/group $$@/etc/group
endef
$(foreach a,amd64 arm64,$(eval $(call image_rootfs,$(a))))

# Each image built for its platform, then the index: the manifest list IMAGE (replaced: podman
# manifest create does not overwrite), pushed with its images as an OCI index into the archive,
# layers gzip-compressed (set, not left to a configuration). The same commit and the same Debian
# packages give the same index digest, printed last.
image-build: $(foreach a,$(IMAGE_ARCHS),build/image/$(a)/rootfs) container/Containerfile
	$(Q)for a in $(IMAGE_ARCHS); do \
	    $(PODMAN) build --quiet --timestamp 0 --layers=false --platform linux/$$a $(PODMAN_BUILD_FLAGS) \
	        --file container/Containerfile --tag $(IMAGE)-$$a --build-arg VERSION=$(VERSION) \
	        --build-arg REVISION=$(REVISION) --build-arg SOURCE=$(IMAGE_SOURCE) build/image/$$a >/dev/null || exit 1; done
	$(Q)$(PODMAN) manifest rm $(IMAGE) >/dev/null 2>&1 || $(PODMAN) untag $(IMAGE) >/dev/null 2>&1 || true
	$(Q)$(PODMAN) manifest create $(IMAGE) >/dev/null
	$(Q)for a in $(IMAGE_ARCHS); do $(PODMAN) manifest add $(IMAGE) containers-storage:$(IMAGE)-$$a >/dev/null || exit 1; done
	$(Q)rm -f $(IMAGE_ARCHIVE) $(IMAGE_ARCHIVE).digest && $(PODMAN) manifest push --quiet --all --format oci \
	    --compression-format gzip --digestfile $(IMAGE_ARCHIVE).digest $(IMAGE) oci-archive:$(IMAGE_ARCHIVE)
	$(Q)for a in $(IMAGE_ARCHS); do \
	    echo "image: $(IMAGE)-$$a $$($(PODMAN) image inspect --format '{{.Os}}/{{.Architecture}}, {{.Size}} bytes, id {{.Id}}' $(IMAGE)-$$a)"; done
	$(Q)echo "image: $(IMAGE_ARCHIVE) ($$(stat -c %s $(IMAGE_ARCHIVE)) bytes), index $$(cat $(IMAGE_ARCHIVE).digest) for $(IMAGE_ARCHS);" \
	    "push it with skopeo copy --all oci-archive:$(IMAGE_ARCHIVE) docker://REGISTRY/imdsd:$(VERSION)"

.PHONY: image image-build

# ---- make install / make uninstall / make man (systemd units, man page) --------------------------
#   make install                          /usr/local/sbin/imdsd, units in /usr/local/lib/systemd/system
#   make install PREFIX=/usr DESTDIR=pkg  for a package: /usr/sbin/imdsd, units in /lib/systemd/system
# The units' ExecStart follows PREFIX; /etc/default/imdsd is installed once, never overwritten
# (mode 0600: it may hold a proxy password). make uninstall keeps it.
PREFIX  ?= /usr/local
SBINDIR  = $(PREFIX)/sbin
MANDIR   = $(PREFIX)/share/man
# systemd reads /usr/local/lib/systemd/system too; Debian 12's packaged units are in /lib/systemd/system
UNITDIR ?= $(if $(filter /usr,$(PREFIX)),/lib/systemd/system,$(PREFIX)/lib/systemd/system)
UNITS    = systemd/imdsd.service systemd/imdsd.socket systemd/imdsd-health.socket

# imdsd(8): the options come from build/imdsd --help itself (man/mkman.sh), the rest from the template
build/imdsd.8: build/imdsd man/imdsd.8.in man/mkman.sh
	$(Q)man/mkman.sh build/imdsd man/imdsd.8.in > $@.tmp && mv $@.tmp $@

man: build/imdsd.8

install: build/imdsd build/imdsd.8
	$(Q)install -d -m 0755 $(DESTDIR)$(SBINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)/etc/default
	$(Q)install -m 0755 build/imdsd $(DESTDIR)$(SBINDIR)/imdsd
	$(Q)for u in $(UNITS); do \
	    sed 's|/usr/local/sbin/imdsd|$(SBINDIR)/imdsd|' $$u > $(DESTDIR)$(UNITDIR)/$${u#systemd/} && \
	    chmod 0644 $(DESTDIR)$(UNITDIR)/$${u#systemd/} || exit 1; done
	$(Q)install -m 0644 build/imdsd.8 $(DESTDIR)$(MANDIR)/man8/imdsd.8
	$(Q)[ -e $(DESTDIR)/etc/default/imdsd ] || install -m 0600 systemd/imdsd.default $(DESTDIR)/etc/default/imdsd
	$(Q)echo "install: imdsd in $(DESTDIR)$(SBINDIR), $(notdir $(UNITS)) in $(DESTDIR)$(UNITDIR), imdsd.8 in $(DESTDIR)$(MANDIR)/man8"

uninstall:
	$(Q)rm -f $(DESTDIR)$(SBINDIR)/imdsd $(DESTDIR)$(MANDIR)/man8/imdsd.8 $(addprefix $(DESTDIR)$(UNITDIR)/,$(notdir $(UNITS)))
	$(Q)[ ! -e $(DESTDIR)/etc/default/imdsd ] || echo "uninstall: kept $(DESTDIR)/etc/default/imdsd (your settings)"

.PHONY: install uninstall man
# ---- end of make install ------------------------------------------------------------------------

deps:
	$(Q)tests/deps.sh

# the cross toolchain and arm64 libraries of the arm64 image, and qemu-user-static that runs its
# binary in make check (tests/deps.sh --arm64): make image and make check install them, make deps
# does not
deps-arm64:
	$(Q)tests/deps.sh --arm64

# clang-format, then the docs against the binary and the tree (tests/check_docs.py: options,
# metrics, links, paths, manifests and units; imdsd(8) renders with man -l)
lint: build/imdsd build/imdsd.8
	$(Q)clang-format --dry-run -Werror daemon/*.c include/*.h tests/unit/*.c tests/unit/*.h tests/fuzz/*.c tests/bench/*.c
	$(Q)$(PY) tests/check_docs.py --binary build/imdsd --man build/imdsd.8

clean:
	rm -rf build

.PHONY: fuzz fuzz-smoke all unit units units-asan units-debug integration check check-full check-systemd check-build demo deps deps-arm64 lint clean
