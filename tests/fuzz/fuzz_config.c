/* libFuzzer: the configuration, argv and environment (config.h), and the identity-header file.
 *
 *  - config_parse never crashes or leaks (config_free in every case), leaves the logging globals
 *    alone, and can be called again (getopt's state does not outlive it);
 *  - CONFIG_ERROR: err is NUL-terminated within errlen, one line of printable bytes, not empty,
 *    an unknown option or a missing value names an option, and it does not depend on the proxy
 *    password's bytes (the same input with other password bytes gives the same err: the password
 *    is never shown, however one reads where the HTTPS_PROXY value's password is);
 *  - CONFIG_EXIT only for --help or --version;
 *  - CONFIG_OK: what config.c promises: a GUID client id, a tenant, a token file, a normalised
 *    https authority with host and port 1..65535, IP literal listeners without duplicates and at
 *    least one serving tokens, values in their ranges, aliases naming served identities, the proxy
 *    exactly HTTPS_PROXY (or https_proxy) unless NO_PROXY (or no_proxy) exempts the authority; or
 *    a valid one-shot mode (--add-loopback-address, --probe);
 *  - config_load_identity_header on a file of the input's bytes: the secret is exactly the file's
 *    content without surrounding blanks, never a cut of it, and a refusal is one line that names
 *    only the file and the reason.
 *
 * Input: byte 0 = the number of argv strings (low 5 bits), whether to load an identity-header file
 * (0x20) and errlen (top 2 bits); then NUL-separated strings: the argv strings, then NAME=VALUE
 * environment entries (IMDSD_FUZZ_SECRET=... is the identity-header file's content). */
#include <arpa/inet.h>
#include <ctype.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"
#include "imds.h"
#include "log.h"
#include "proxy.h"

#include "fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_ARGS   32
#define MAX_ENV    64
#define ERR_SPACE  600
#define SECRET_ENV "IMDSD_FUZZ_SECRET"

static char *envs[MAX_ENV]; /* "NAME=VALUE" */
static int nenv;

static const char *fake_getenv(const char *name)
{
    size_t n = strlen(name);
    for (int i = 0; i < nenv; i++)
        if (strncmp(envs[i], name, n) == 0 && envs[i][n] == '=')
            return envs[i] + n + 1;
    return NULL;
}

NOCOV static int nonempty(const char *s)
{
    return s && *s;
}

/* ---- one run of config_parse ---------------------------------------------------------------- */

struct run {
    int rc;
    char err[ERR_SPACE];
};

NOCOV static void parse(struct config *c, char **args, int nargs, size_t errlen, struct run *r)
{
    char *argv[MAX_ARGS + 2];
    argv[0] = "imdsd";
    for (int i = 0; i < nargs; i++)
        argv[i + 1] = args[i];
    argv[nargs + 1] = NULL;
    memset(r->err, 'Z', sizeof r->err);
    enum log_level level = log_min_level;
    enum log_format format = log_format;
    r->rc = config_parse(c, nargs + 1, argv, fake_getenv, r->err, errlen);
    CHECK(log_min_level == level && log_format == format);
    CHECK(r->rc == CONFIG_OK || r->rc == CONFIG_EXIT || r->rc == CONFIG_ERROR);
    if (r->rc != CONFIG_ERROR)
        return;
    CHECK(r->err[errlen] == 'Z'); /* nothing written past errlen */
    CHECK(memchr(r->err, 0, errlen) != NULL);
    CHECK(errlen < 2 || r->err[0] != 0);
    for (const char *p = r->err; *p; p++)
        CHECK((unsigned char)*p >= 0x20 && (unsigned char)*p != 0x7f); /* one line */
    /* the whole message (not cut where a quoted value happened to end the same way) */
    size_t n = strlen(r->err);
    int whole = errlen == ERR_SPACE - 1 && n < errlen - 1;
    static const char unknown[] = ": unknown option (see --help)", missing[] = ": missing value";
    if (whole && n > sizeof unknown && strcmp(r->err + n - (sizeof unknown - 1), unknown) == 0)
        CHECK(r->err[0] == '-');
    if (whole && n > sizeof missing && strcmp(r->err + n - (sizeof missing - 1), missing) == 0)
        CHECK(strncmp(r->err, "--", 2) == 0);
}

/* ---- CONFIG_OK: what config.c promises ------------------------------------------------------ */

NOCOV static int is_ip(const char *h)
{
    unsigned char a[16];
    return inet_pton(AF_INET, h, a) == 1 || inet_pton(AF_INET6, h, a) == 1;
}

NOCOV static int port_ok(const char *p)
{
    size_t n = strlen(p);
    if (n == 0 || n > 5)
        return 0;
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q))
            return 0;
    long v = atol(p);
    return v >= 1 && v <= 65535;
}

NOCOV static int name_ok(const char *s, int dots_ok)
{
    size_t n = strlen(s);
    if (n == 0 || n > 253)
        return 0;
    for (const char *q = s; *q; q++)
        if (!isalnum((unsigned char)*q) && *q != '-' && !(dots_ok && *q == '.'))
            return 0;
    return 1;
}

NOCOV static void check_listen(const struct config_listen *l)
{
    CHECK(memchr(l->host, 0, sizeof l->host) && is_ip(l->host));
    CHECK(l->port >= 1 && l->port <= 65535);
}

NOCOV static void check_ok(const struct config *c)
{
    CHECK(c->log_level >= LOG_DEBUG && c->log_level <= LOG_OFF);
    CHECK(c->log_format == LOG_FORMAT_LOGFMT || c->log_format == LOG_FORMAT_JSON);
    CHECK(c->max_connections >= 1 && c->max_connections <= 65536);
    CHECK(c->idle_timeout_s >= 1 && c->idle_timeout_s <= 3600);
    CHECK(c->header_timeout_s >= 1 && c->header_timeout_s <= 3600);
    CHECK(c->entra_timeout_s >= 1 && c->entra_timeout_s <= 300);
    CHECK(c->shutdown_grace_s <= 60 && c->identity_header_overlap_s <= 86400);
    CHECK(!c->arc_key_dir || (c->arc_key_dir[0] == '/' && strlen(c->arc_key_dir) <= 200));
    CHECK(c->arc_gid >= -1 && c->arc_gid <= 0x7fffffff);
    CHECK(c->nlisten >= 0 && c->nlisten <= CONFIG_MAX_LISTEN);
    for (int i = 0; i < c->nlisten; i++)
        check_listen(&c->listen[i]);
    CHECK(c->nallowed >= 0 && c->nallowed <= CONFIG_MAX_CLIENT_IDS);
    for (int i = 0; i < c->nallowed; i++)
        CHECK(imds_is_guid(c->allowed_client_ids[i]));
    CHECK(c->nallowed_hosts >= 0 && c->nallowed_hosts <= CONFIG_MAX_HOSTS);
    for (int i = 0; i < c->nallowed_hosts; i++)
        CHECK(name_ok(c->allowed_hosts[i], 1) && c->allowed_hosts[i][0] != '.' &&
              !strstr(c->allowed_hosts[i], ".."));
    CHECK(c->nallowed_resources >= 0 && c->nallowed_resources <= CONFIG_MAX_RESOURCES);
    for (int i = 0; i < c->nallowed_resources; i++)
        CHECK(imds_resource_pattern_ok(c->allowed_resources[i]));
    CHECK(!c->identity_header && c->identity_header_len == 0); /* read later, not here */

    if (c->add_address[0] || c->probe) { /* the one-shot modes */
        unsigned char a[4];
        CHECK(!c->add_address[0] || inet_pton(AF_INET, c->add_address, a) == 1);
        if (c->probe) {
            check_listen(&c->probe_at);
            CHECK(c->probe_path[0] == '/' && memchr(c->probe_path, 0, sizeof c->probe_path));
            for (const char *q = c->probe_path; *q; q++)
                CHECK(isgraph((unsigned char)*q));
        }
        return;
    }
    CHECK(c->client_id && imds_is_guid(c->client_id));
    CHECK(c->tenant_id && (imds_is_guid(c->tenant_id) || name_ok(c->tenant_id, 1)));
    CHECK(nonempty(c->token_file) && nonempty(c->ca_file));
    /* the authority: "https://host[:port][/path]", normalised */
    CHECK(c->authority && c->authority_host && c->authority_path);
    size_t an = strlen(c->authority);
    CHECK(strncasecmp(c->authority, "https://", 8) == 0 && an > 8);
    CHECK(c->authority[an - 1] != '/' && !isspace((unsigned char)c->authority[an - 1]));
    CHECK(c->authority_host[0] && strlen(c->authority_host) < 256);
    CHECK(strstr(c->authority + 8, c->authority_host) ==
          c->authority + 8 + (c->authority[8] == '['));
    CHECK(port_ok(c->authority_port));
    size_t pn = strlen(c->authority_path);
    CHECK(pn == 0 || c->authority_path[0] == '/');
    CHECK(pn < an && strcmp(c->authority + an - pn, c->authority_path) == 0);
    for (const char *q = c->authority_path; *q; q++)
        CHECK((unsigned char)*q > ' ' && *q != '?' && *q != '#');
    if (!is_ip(c->authority_host))
        CHECK(name_ok(c->authority_host, 1));
    /* listeners: no duplicate, one serving tokens */
    int ntoken = 0;
    CHECK(c->nlisten >= 1);
    for (int i = 0; i < c->nlisten; i++) {
        ntoken += !c->listen[i].health;
        for (int k = 0; k < i; k++)
            CHECK(c->listen[k].port != c->listen[i].port ||
                  strcmp(c->listen[k].host, c->listen[i].host) != 0);
    }
    CHECK(ntoken >= 1);
    /* aliases name a served identity */
    for (int i = 0; i < c->naliases; i++) {
        const struct imds_alias *a = &c->aliases[i];
        CHECK(imds_is_guid(a->key) || imds_is_resource_id(a->key));
        int served = strcasecmp(a->client_id, c->client_id) == 0;
        for (int k = 0; k < c->nallowed; k++)
            served |= strcasecmp(a->client_id, c->allowed_client_ids[k]) == 0;
        CHECK(served);
    }
    /* the proxy: the first of HTTPS_PROXY, https_proxy set, unless NO_PROXY, no_proxy exempts */
    const char *v = fake_getenv("HTTPS_PROXY"), *np = fake_getenv("NO_PROXY");
    if (!nonempty(v))
        v = fake_getenv("https_proxy");
    if (!nonempty(np))
        np = fake_getenv("no_proxy");
    int want =
        nonempty(v) && !(nonempty(np) && proxy_bypass(np, c->authority_host, c->authority_port));
    CHECK(c->use_proxy == want);
    if (want) {
        struct proxy p;
        const char *why;
        CHECK(proxy_parse(&p, v, &why) == 0);
        CHECK(c->proxy.host && strcmp(c->proxy.host, p.host) == 0);
        CHECK(strcmp(c->proxy.port, p.port) == 0 && port_ok(c->proxy.port));
        CHECK(strcmp(proxy_describe(&c->proxy), proxy_describe(&p)) == 0);
        CHECK(!c->proxy.authorization == !p.authorization);
        CHECK(!p.authorization || strcmp(c->proxy.authorization, p.authorization) == 0);
        proxy_free(&p);
    } else {
        CHECK(!c->proxy.host && !c->proxy.authorization && !c->proxy.description);
    }
}

/* ---- the proxy password never shows in err -------------------------------------------------- */

/* Replaces the letters and digits of [a, b) (%-escapes aside) by others: the URL parses the same
 * way, with another password. Returns whether anything changed. */
NOCOV static int rotate(char *s, size_t a, size_t b)
{
    int changed = 0;
    for (size_t i = a; i < b; i++) {
        char ch = s[i];
        if (ch == '%') {
            i += 2;
            continue;
        }
        if (ch >= '0' && ch <= '9')
            s[i] = (char)('0' + (ch - '0' + 1) % 10);
        else if (ch >= 'a' && ch <= 'z')
            s[i] = (char)('a' + (ch - 'a' + 1) % 26);
        else if (ch >= 'A' && ch <= 'Z')
            s[i] = (char)('A' + (ch - 'A' + 1) % 26);
        else
            continue;
        changed = 1;
    }
    return changed;
}

/* Where the password of url is under one reading: 0 after a valid scheme (or from the start,
 * blanks aside), 1 after the first "://" (proxy_parse's); from the userinfo's first ':' to the
 * last '@'. */
NOCOV static int password_at(const char *url, int reading, size_t *a, size_t *b)
{
    size_t n = strlen(url), r = 0;
    while (r < n && isspace((unsigned char)url[r]))
        r++;
    if (reading == 0) {
        size_t q = r;
        if (isalpha((unsigned char)url[q]))
            while (url[q] && (isalnum((unsigned char)url[q]) || strchr("+-.", url[q])))
                q++;
        if (q > r && strncmp(url + q, "://", 3) == 0)
            r = q + 3;
    } else {
        const char *sep = strstr(url, "://");
        if (!sep)
            return 0;
        r = (size_t)(sep + 3 - url);
    }
    const char *at = strrchr(url + r, '@');
    const char *colon = at ? memchr(url + r, ':', (size_t)(at - url - r)) : NULL;
    if (!colon)
        return 0;
    *a = (size_t)(colon + 1 - url);
    *b = (size_t)(at - url);
    return *b > *a;
}

NOCOV static void check_password_hidden(char **args, int nargs, size_t errlen,
                                        const struct run *first)
{
    static const char *const vars[] = {"HTTPS_PROXY=", "https_proxy="};
    for (int reading = 0; reading < 2; reading++) {
        char *saved[MAX_ENV] = {0};
        int changed = 0;
        for (int i = 0; i < nenv; i++) {
            for (int k = 0; k < 2; k++) {
                size_t vl = strlen(vars[k]), a, b;
                if (strncmp(envs[i], vars[k], vl) != 0 ||
                    !password_at(envs[i] + vl, reading, &a, &b))
                    continue;
                saved[i] = strdup(envs[i]);
                changed |= rotate(envs[i], vl + a, vl + b);
            }
        }
        if (changed) {
            struct config c;
            struct run r;
            parse(&c, args, nargs, errlen, &r);
            config_free(&c);
            if (r.rc == CONFIG_ERROR && strcmp(r.err, first->err) != 0) {
                fprintf(stderr, "fuzz_config: err depends on the proxy password:\n  %s\n  %s\n",
                        first->err, r.err);
                __builtin_trap();
            }
            CHECK(r.rc == first->rc);
        }
        for (int i = 0; i < nenv; i++) {
            if (saved[i]) {
                strcpy(envs[i], saved[i]);
                free(saved[i]);
            }
        }
    }
}

/* ---- config_load_identity_header on a file of the input's bytes ----------------------------- */

NOCOV static void check_secret_file(const char *content)
{
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("fuzz_config_secret", 0);
        CHECK(fd >= 0);
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    size_t n = strlen(content);
    CHECK(ftruncate(fd, 0) == 0 && pwrite(fd, content, n, 0) == (ssize_t)n);

    struct config c;
    char err[ERR_SPACE];
    memset(&c, 0, sizeof c);
    c.identity_header_file = path;
    int rc = config_load_identity_header(&c, err, sizeof err);
    c.identity_header_file = NULL;

    /* the file's content without surrounding blanks */
    size_t s = 0, e = n;
    while (s < e && isspace((unsigned char)content[s]))
        s++;
    while (e > s && isspace((unsigned char)content[e - 1]))
        e--;
    int printable = 1;
    for (size_t i = s; i < e; i++)
        printable &= (unsigned char)content[i] >= 0x20 && (unsigned char)content[i] < 0x7f;
    int valid = e > s && e - s <= CONFIG_MAX_SECRET && printable;

    if (rc == 0) {
        CHECK(valid); /* never a cut of a longer file */
        CHECK(c.identity_header && c.identity_header_len == e - s &&
              memcmp(c.identity_header, content + s, e - s) == 0 &&
              strlen(c.identity_header) == e - s);
    } else {
        CHECK(rc == -1 && !c.identity_header);
        CHECK(!valid || n > CONFIG_MAX_SECRET + 1); /* a valid secret is refused only if long */
        static const char *const whys[] = {"is empty", "holds more than 255 bytes",
                                           "holds characters that cannot be sent in an HTTP header",
                                           "cannot be read"};
        char want[ERR_SPACE];
        int found = 0;
        for (size_t i = 0; i < sizeof whys / sizeof *whys; i++) {
            snprintf(want, sizeof want, "--identity-header-file: '%s' %s", path, whys[i]);
            found |= strcmp(err, want) == 0;
        }
        CHECK(found); /* the file and the reason, nothing of the content */
    }
    config_free(&c);
}

/* ---- the input ------------------------------------------------------------------------------ */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t errlens[] = {ERR_SPACE - 1, 100, 17, 1};
    static int quiet;
    if (!quiet) { /* --help and --version print to stdout */
        int fd = open("/dev/null", O_WRONLY);
        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            close(fd);
        }
        quiet = 1;
    }
    if (size < 1)
        return 0;
    int want_args = data[0] & 31, load_secret = data[0] & 0x20;
    size_t errlen = errlens[data[0] >> 6];

    /* the strings, in a copy that dies with this input (getopt must not keep pointers into it) */
    char *copy = malloc(size);
    memcpy(copy, data + 1, size - 1);
    copy[size - 1] = 0;
    char *args[MAX_ARGS];
    int nargs = 0;
    nenv = 0;
    for (char *p = copy, *end = copy + size - 1; p <= end; p += strlen(p) + 1) {
        if (nargs < want_args)
            args[nargs++] = p;
        else if (nenv < MAX_ENV && strchr(p, '='))
            envs[nenv++] = p;
    }

    struct config c;
    struct run r;
    parse(&c, args, nargs, errlen, &r);
    if (r.rc == CONFIG_OK)
        check_ok(&c);
    if (r.rc == CONFIG_EXIT) { /* only --help or --version (abbreviated, perhaps) */
        int asked = 0;
        for (int i = 0; i < nargs; i++)
            asked |= (strncmp(args[i], "--h", 3) == 0 &&
                      strncmp("--help", args[i], strlen(args[i])) == 0) ||
                     (strncmp(args[i], "--v", 3) == 0 &&
                      strncmp("--version", args[i], strlen(args[i])) == 0);
        CHECK(asked);
    }
    config_free(&c);
    check_password_hidden(args, nargs, errlen, &r);
    if (load_secret) {
        const char *content = fake_getenv(SECRET_ENV);
        if (content)
            check_secret_file(content);
    }
    free(copy);
    return 0;
}
