#include "config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "imds.h"
#include "util.h"

/* --help: this head, a paragraph per row of opts[] below, this tail */
static const char USAGE_HEAD[] =
    "Usage: imdsd [OPTIONS]\n"
    "Serves Entra ID access tokens for a Kubernetes workload identity on a local\n"
    "IMDS-compatible endpoint (GET /metadata/identity/oauth2/token).\n"
    "\n";
static const char USAGE_TAIL[] =
    "  --help, --version\n"
    "\n"
    "Entra is reached through the HTTP CONNECT proxy in HTTPS_PROXY (or https_proxy), unless\n"
    "NO_PROXY (or no_proxy) names the authority host.\n";

static void set(char **dst, const char *v)
{
    free(*dst);
    *dst = xstrdup(v);
}

int config_parse_listen(const char *s, struct config_listen *l)
{
    const char *colon;
    size_t hlen;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (!close || close[1] != ':')
            return -1;
        hlen = (size_t)(close - s - 1);
        s++;
        colon = close + 1;
    } else {
        colon = strchr(s, ':');
        if (!colon || strchr(colon + 1, ':'))
            return -1; /* an IPv6 address needs brackets */
        hlen = (size_t)(colon - s);
    }
    if (hlen == 0 || hlen >= sizeof l->host)
        return -1;
    memcpy(l->host, s, hlen);
    l->host[hlen] = 0;
    unsigned char addr[16];
    if (inet_pton(AF_INET, l->host, addr) != 1 && inet_pton(AF_INET6, l->host, addr) != 1)
        return -1;
    const char *p = colon + 1;
    if (!*p || strlen(p) > 5)
        return -1;
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q))
            return -1;
    l->port = atoi(p);
    return l->port >= 1 && l->port <= 65535 ? 0 : -1;
}

const char *config_listen_str(const struct config_listen *l, char out[CONFIG_LISTEN_STR])
{
    return hostport_str(out, CONFIG_LISTEN_STR, l->host, l->port);
}

/* Collapses "//", "." and ".." in the absolute path p in place, as Go's path.Clean (which
 * url.JoinPath applies to the token proxy's path), without a trailing '/'. */
static void clean_path(char *p)
{
    char *out = p, *in = p;
    while (*in) {
        while (*in == '/')
            in++;
        char *seg = in;
        while (*in && *in != '/')
            in++;
        size_t n = (size_t)(in - seg);
        if (n == 0 || (n == 1 && seg[0] == '.'))
            continue;
        if (n == 2 && seg[0] == '.' && seg[1] == '.') {
            while (out > p && *--out != '/')
                ;
            continue;
        }
        *out++ = '/';
        memmove(out, seg, n);
        out += n;
    }
    *out = 0;
}

int config_parse_url(struct config_url *u, const char *url, const char **why)
{
    static const char scheme[] = "https://";
    while (isspace((unsigned char)*url))
        url++;
    size_t n = strlen(url);
    while (n && (isspace((unsigned char)url[n - 1]) || url[n - 1] == '/'))
        n--;
    if (strncasecmp(url, scheme, sizeof scheme - 1) != 0) {
        *why = strstr(url, "://") ? "must be an https:// URL" : "must start with https://";
        return -1;
    }
    if (n <= sizeof scheme - 1)
        goto badhost;
    const char *host = url + sizeof scheme - 1, *end = url + n;
    const char *hend = host;
    while (hend < end && *hend != '/' && *hend != '?' && *hend != '#')
        hend++;
    const char *port = NULL;
    char hbuf[256];
    size_t hlen;
    if (memchr(host, '@', (size_t)(hend - host))) {
        *why = "must not hold a user name or password";
        return -1;
    }
    if (host < hend && *host == '[') {
        const char *close = memchr(host, ']', (size_t)(hend - host));
        if (!close) {
            *why = "has an unterminated IPv6 address";
            return -1;
        }
        hlen = (size_t)(close - host - 1);
        if (hlen >= sizeof hbuf)
            goto badhost;
        memcpy(hbuf, host + 1, hlen);
        hbuf[hlen] = 0;
        struct in6_addr a6;
        if (inet_pton(AF_INET6, hbuf, &a6) != 1)
            goto badhost; /* brackets hold an IPv6 address, nothing else */
        if (close + 1 < hend) {
            if (close[1] != ':')
                goto badhost;
            port = close + 2;
        }
    } else {
        const char *colon = memchr(host, ':', (size_t)(hend - host));
        hlen = (size_t)((colon ? colon : hend) - host);
        if (hlen > 253) /* the longest DNS name */
            goto badhost;
        memcpy(hbuf, host, hlen);
        port = colon ? colon + 1 : NULL;
        for (size_t i = 0; i < hlen; i++)
            if (!isalnum((unsigned char)hbuf[i]) && hbuf[i] != '-' && hbuf[i] != '.')
                goto badhost;
    }
    hbuf[hlen] = 0;
    if (hlen == 0)
        goto badhost;
    char pbuf[6] = "443";
    if (port) {
        size_t plen = (size_t)(hend - port);
        if (plen == 0 || plen > 5)
            goto badport;
        for (size_t i = 0; i < plen; i++)
            if (!isdigit((unsigned char)port[i]))
                goto badport;
        memcpy(pbuf, port, plen);
        pbuf[plen] = 0;
        long p = atol(pbuf);
        if (p < 1 || p > 65535)
            goto badport;
    }
    for (const char *q = hend; q < end; q++)
        if ((unsigned char)*q <= ' ' || *q == '?' || *q == '#') {
            *why = "has a query, fragment or space in its path";
            return -1;
        }
    config_url_free(u);
    u->url = xstrndup(url, n);
    u->host = xstrdup(hbuf);
    memcpy(u->port, pbuf, sizeof pbuf);
    u->path = xstrndup(hend, (size_t)(end - hend));
    return 0;
badhost:
    *why = "has no valid host name";
    return -1;
badport:
    *why = "has an invalid port";
    return -1;
}

void config_url_free(struct config_url *u)
{
    free(u->url);
    free(u->host);
    free(u->path);
    memset(u, 0, sizeof *u);
}

int config_set_authority(struct config *c, const char *url, const char **why)
{
    struct config_url u = {0};
    if (config_parse_url(&u, url, why) < 0)
        return -1;
    free(c->authority);
    free(c->authority_host);
    free(c->authority_path);
    c->authority = u.url;
    c->authority_host = u.host;
    memcpy(c->authority_port, u.port, sizeof u.port);
    c->authority_path = u.path;
    return 0;
}

static int parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out)
{
    char *end;
    errno = 0;
    if (!isdigit((unsigned char)*s))
        return -1;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return -1;
    *out = (unsigned)v;
    return 0;
}

/* A DNS name: letters, digits, '-' and '.', at most 253 bytes, no empty label. */
static int valid_host_name(const char *t)
{
    size_t n = strlen(t);
    if (n == 0 || n > 253 || t[0] == '.' || strstr(t, ".."))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)t[i]) && t[i] != '-' && t[i] != '.')
            return 0;
    return 1;
}

static int valid_tenant(const char *t)
{
    if (imds_is_guid(t))
        return 1;
    size_t n = strlen(t);
    if (n == 0 || n > 253)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)t[i]) && t[i] != '-' && t[i] != '.')
            return 0;
    return 1;
}

size_t config_check_secret(const char *buf, size_t n, size_t *start, const char **why)
{
    size_t s = 0, whole = n;
    while (n > 0 && isspace((unsigned char)buf[n - 1]))
        n--;
    while (s < n && isspace((unsigned char)buf[s]))
        s++;
    *start = s;
    /* n counts leading blanks too, and a file of CONFIG_SECRET_READ bytes or more is too long
     * whatever its first bytes hold (blanks, say), so that it never passes as a cut secret */
    *why = whole >= CONFIG_SECRET_READ ? "holds more than 255 bytes"
           : n == s                    ? "is empty"
           : n > CONFIG_MAX_SECRET     ? "holds more than 255 bytes"
                                       : NULL;
    for (size_t i = s; i < n && !*why; i++)
        if ((unsigned char)buf[i] < 0x20 || (unsigned char)buf[i] >= 0x7f)
            *why = "holds characters that cannot be sent in an HTTP header";
    return *why ? 0 : n - s;
}

/* err is one line: the values it quotes, from argv or the environment, may hold control
 * characters */
static void one_line(char *err, size_t errlen)
{
    for (char *p = err; errlen && *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
}

int config_load_identity_header(struct config *c, char *err, size_t errlen)
{
    char buf[CONFIG_SECRET_READ];
    /* not stdio: its buffer would keep a copy of the secret in freed memory. O_NONBLOCK: a FIFO
     * (or a device) at the path must not hang the start-up; only a regular file is read. */
    int fd = open(c->identity_header_file, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) {
        snprintf(err, errlen, "--identity-header-file: cannot read '%s': %s",
                 c->identity_header_file, strerror(errno));
        one_line(err, errlen);
        return -1;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        snprintf(err, errlen, "--identity-header-file: '%s' is not a regular file",
                 c->identity_header_file);
        one_line(err, errlen);
        return -1;
    }
    size_t n = 0;
    int rerr = 0;
    while (n < sizeof buf) {
        ssize_t r = read(fd, buf + n, sizeof buf - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            rerr = 1;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    size_t start;
    const char *why;
    size_t len = config_check_secret(buf, n, &start, &why);
    if (rerr)
        why = "cannot be read";
    if (why) {
        secret_zero(buf, sizeof buf);
        snprintf(err, errlen, "--identity-header-file: '%s' %s", c->identity_header_file, why);
        one_line(err, errlen);
        return -1;
    }
    c->identity_header = xstrndup(buf + start, len);
    c->identity_header_len = len;
    secret_zero(buf, sizeof buf);
    return 0;
}

/* "IP:PORT[/PATH]" into c->probe_at and c->probe_path (default /readyz) */
static int parse_probe(struct config *c, const char *v)
{
    const char *slash = strchr(v, '/');
    size_t alen = slash ? (size_t)(slash - v) : strlen(v);
    char addr[CONFIG_LISTEN_STR];
    if (alen >= sizeof addr)
        return -1;
    memcpy(addr, v, alen);
    addr[alen] = 0;
    if (config_parse_listen(addr, &c->probe_at) < 0)
        return -1;
    const char *path = slash ? slash : "/readyz";
    if (strlen(path) >= sizeof c->probe_path)
        return -1;
    for (const char *q = path; *q; q++)
        if (!isgraph((unsigned char)*q))
            return -1;
    strcpy(c->probe_path, path);
    c->probe = 1;
    return 0;
}

/* ---- the options: one row each --------------------------------------------------------------- */

enum opt_kind {
    OPT_STRING,  /* char *, replaced */
    OPT_PATH,    /* char *, never empty */
    OPT_UINT,    /* unsigned, lo to hi */
    OPT_SECONDS, /* unsigned, lo to hi seconds */
    OPT_LIST,    /* char *[max] and its int count, each value valid() */
    OPT_CUSTOM,  /* parse() */
    OPT_HELP,
    OPT_VERSION,
};

/* One config_parse call: where its error goes, and what is checked once the identity is known. */
struct parse {
    struct config *c;
    char *err;
    size_t errlen;
    const char *authority; /* --authority-host, checked after the identity */
    char authority_src[32];
};

struct opt;
/* Stores v (given as name: "--flag" or the environment variable); CONFIG_OK, or CONFIG_ERROR
 * with p->err written (fail, bad, invalid). */
typedef int opt_parse_fn(struct parse *p, const struct opt *o, const char *name, const char *v);

struct opt {
    const char *name; /* the long option, without "--" */
    const char *env;  /* read when the flag is not given (empty counts as not set), or NULL */
    const char *arg;  /* the argument in --help; NULL: the option takes none */
    int optional;     /* the argument may be left out: "--NAME" alone, "--NAME V" or "--NAME=V" */
    /* --help's text: '\n' starts another line in the text column, {env} is "[ENV]" and
     * {default} the default; NULL: not listed (--help, --version: the tail) */
    const char *help;
    enum opt_kind kind;
    size_t field; /* F(): offsetof the value in struct config */
    int max;      /* > 0: repeatable, at most max times ("at most MAX NOUN"), counted in count */
    size_t count;
    const char *noun;
    unsigned lo, hi;    /* OPT_UINT, OPT_SECONDS */
    const char *def;    /* the default, stored as if given before the flags (repeatable: not) */
    const char *expect; /* "invalid value 'V' (EXPECT)"; OPT_UINT, OPT_SECONDS: the bounds */
    int (*valid)(const char *v); /* OPT_LIST */
    const char *why;             /* OPT_LIST: "'V' WHY" when not valid */
    opt_parse_fn *parse;         /* OPT_CUSTOM */
};

#define HELP_COL 26 /* --help's text column */

static int fail(struct parse *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct parse *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, p->errlen, fmt, ap);
    va_end(ap);
    one_line(p->err, p->errlen);
    return CONFIG_ERROR;
}

static int bad(struct parse *p, const char *name, const char *v, const char *why)
{
    return fail(p, "%s: '%s' %s", name, v, why);
}

/* The one message for a value out of range or not one of those allowed. */
static int invalid(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    char range[48];
    const char *expect = o->expect;
    if (!expect) {
        snprintf(range, sizeof range, "%u to %u%s", o->lo, o->hi,
                 o->kind == OPT_SECONDS ? " seconds" : "");
        expect = range;
    }
    return fail(p, "%s: invalid value '%s' (%s)", name, v, expect);
}

static int add_listen(struct parse *p, const char *name, const char *v, int health)
{
    struct config *c = p->c;
    if (config_parse_listen(v, &c->listen[c->nlisten]) < 0)
        return fail(p, "%s: invalid address '%s' (want IP:PORT or [IPv6]:PORT)", name, v);
    c->listen[c->nlisten++].health = health;
    return CONFIG_OK;
}

static int parse_listen(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    (void)o;
    return add_listen(p, name, v, 0);
}

static int parse_health_listen(struct parse *p, const struct opt *o, const char *name,
                               const char *v)
{
    (void)o;
    return add_listen(p, name, v, 1);
}

static int parse_authority(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    (void)o;
    p->authority = v;
    snprintf(p->authority_src, sizeof p->authority_src, "%s", name);
    return CONFIG_OK;
}

static int parse_token_proxy(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    (void)o;
    const char *why;
    struct config *c = p->c;
    if (config_parse_url(&c->token_proxy, v, &why) < 0)
        return bad(p, name, v, why);
    clean_path(c->token_proxy.path); /* url.JoinPath's path.Clean */
    free(c->token_proxy_src);
    c->token_proxy_src = xstrdup(name);
    return CONFIG_OK;
}

static int parse_sni_name(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    (void)o;
    if (!valid_host_name(v) || strlen(v) > 253)
        return bad(p, name, v, "is not a DNS name (letters, digits, '-' and '.')");
    set(&p->c->sni_name, v);
    return CONFIG_OK;
}

static int parse_alias(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    (void)o;
    const char *eq = strrchr(v, '=');
    if (!eq || !imds_is_guid(eq + 1))
        return bad(p, name, v, "is not ID=CLIENT_ID with a GUID client id");
    struct imds_alias *a = &p->c->aliases[p->c->naliases++];
    a->key = xstrndup(v, (size_t)(eq - v));
    a->client_id = xstrdup(eq + 1);
    if (!imds_is_guid(a->key) && !imds_is_resource_id(a->key))
        return bad(p, name, a->key,
                   "is neither an object id (GUID) nor an ARM resource id (/subscriptions/...)");
    return CONFIG_OK;
}

/* [ID=]RESOURCE: ID is a GUID or an ARM resource id, followed by '='; otherwise it is all the
 * resource. Resolved and checked against the identities and --allow-resource in finish(). */
static int add_prefetch(struct parse *p, const char *name, const char *v)
{
    if (p->c->nprefetch >= CONFIG_MAX_PREFETCH)
        return fail(p, "%s: at most %d tokens", name, CONFIG_MAX_PREFETCH);
    struct config_prefetch *f = &p->c->prefetch[p->c->nprefetch++];
    const char *eq = strchr(v, '=');
    char guid[37];
    int has_id = 0;
    if (eq && *v == '/') {
        has_id = 1;
    } else if (eq && eq - v == 36) {
        memcpy(guid, v, 36);
        guid[36] = 0;
        has_id = imds_is_guid(guid);
    }
    f->id = has_id ? xstrndup(v, (size_t)(eq - v)) : NULL;
    f->resource = xstrdup(has_id ? eq + 1 : v);
    if (has_id && !imds_is_guid(f->id) && !imds_is_resource_id(f->id))
        return bad(p, name, v, "names an identity that is not a GUID or /subscriptions/... id");
    if (!imds_resource_ok(f->resource, strlen(f->resource)))
        return bad(p, name, v, "is not [ID=]RESOURCE with a resource URI (no spaces)");
    return CONFIG_OK;
}

/* --prefetch V, or IMDSD_PREFETCH: several, separated by spaces or commas (the workload-identity
 * webhook passes only its own flags to the sidecar it injects: an image made FROM imdsd's can set
 * the variable for every pod) */
static int parse_prefetch(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    (void)o;
    if (name[0] == '-')
        return add_prefetch(p, name, v);
    char item[IMDS_MAX_RESOURCE + 200];
    while (*v) {
        size_t n = strcspn(v, " \t\n,");
        if (n >= sizeof item)
            return fail(p, "%s: an item is over %zu bytes", name, sizeof item - 1);
        memcpy(item, v, n);
        item[n] = 0;
        int rc = n ? add_prefetch(p, name, item) : CONFIG_OK;
        if (rc != CONFIG_OK)
            return rc;
        v += n + (v[n] != 0);
    }
    return CONFIG_OK;
}

static int parse_log_level(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    /* the proxy sidecar's levels too, as the webhook passes its own: "" (unset), warning, trace,
     * all */
    if (!*v)
        v = "info";
    else if (strcasecmp(v, "warning") == 0)
        v = "warn";
    else if (strcasecmp(v, "trace") == 0 || strcasecmp(v, "all") == 0)
        v = "debug";
    return log_level_parse(v, &p->c->log_level) < 0 ? invalid(p, o, name, v) : CONFIG_OK;
}

static int parse_log_format(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    return log_format_parse(v, &p->c->log_format) < 0 ? invalid(p, o, name, v) : CONFIG_OK;
}

static int parse_arc_dir(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    (void)o;
    if (v[0] != '/' || strlen(v) > 200)
        return bad(p, name, v, "is not an absolute path of at most 200 bytes");
    set(&p->c->arc_key_dir, v);
    return CONFIG_OK;
}

static int parse_arc_group(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    (void)o;
    unsigned gid;
    if (parse_uint(v, 0, 0x7fffffff, &gid) == 0) {
        p->c->arc_gid = (long)gid;
        return CONFIG_OK;
    }
    const struct group *g = getgrnam(v);
    if (!g)
        return bad(p, name, v, "is neither a known group nor a number");
    p->c->arc_gid = (long)g->gr_gid;
    return CONFIG_OK;
}

static int parse_add_address(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    (void)o;
    struct in_addr a;
    if (strlen(v) >= sizeof p->c->add_address || inet_pton(AF_INET, v, &a) != 1)
        return bad(p, name, v, "is not an IPv4 address");
    strcpy(p->c->add_address, v);
    return CONFIG_OK;
}

static int parse_probe_opt(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    if (!v) { /* alone, as the proxy sidecar's postStart hook runs it: wait until imdsd is ready */
        p->c->probe = 2;
        return CONFIG_OK;
    }
    return parse_probe(p->c, v) < 0 ? invalid(p, o, name, v) : CONFIG_OK;
}

/* The workload-identity proxy sidecar's --proxy-port: serve tokens on 127.0.0.1:N, where the
 * init container's iptables rule sends 169.254.169.254:80 */
static int parse_proxy_port(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    unsigned port;
    char addr[32];
    if (parse_uint(v, 1, 65535, &port) < 0)
        return invalid(p, o, name, v);
    p->c->proxy_port = port;
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    return add_listen(p, name, addr, 0);
}

/* offsetof member in struct config, which must be of type (a compile error otherwise) */
#define F(member, type)                                                                            \
    _Generic(((struct config *)0)->member, type : offsetof(struct config, member))

/* In --help's order. Adding an option: its field in struct config, and a row here. */
static const struct opt opts[] = {
    {.name = "listen",
     .arg = "ADDR:PORT",
     .kind = OPT_CUSTOM,
     .parse = parse_listen,
     .max = CONFIG_MAX_LISTEN,
     .count = F(nlisten, int),
     .noun = "addresses with --listen and --health-listen",
     .def = CONFIG_DEFAULT_LISTEN,
     .help = "address to serve on, repeatable (default {default};\n"
             "IPv6 as [::1]:8000)"},
    {.name = "health-listen",
     .arg = "ADDR:PORT",
     .kind = OPT_CUSTOM,
     .parse = parse_health_listen,
     .max = CONFIG_MAX_LISTEN,
     .count = F(nlisten, int),
     .noun = "addresses with --listen and --health-listen",
     .help = "also serve /healthz and /readyz (and never a token) here, for\n"
             "the kubelet's probes, e.g. 0.0.0.0:8001; repeatable"},
    {.name = "proxy-port",
     .arg = "PORT",
     .kind = OPT_CUSTOM,
     .parse = parse_proxy_port,
     .max = CONFIG_MAX_LISTEN,
     .count = F(nlisten, int),
     .noun = "addresses with --listen and --health-listen",
     .expect = "1 to 65535",
     .help = "serve tokens on 127.0.0.1:PORT: the workload-identity proxy\n"
             "sidecar's flag, for its image swapped for imdsd's"},
    {.name = "client-id",
     .env = "AZURE_CLIENT_ID",
     .arg = "GUID",
     .kind = OPT_STRING,
     .field = F(client_id, char *),
     .help = "default identity                {env}"},
    {.name = "tenant-id",
     .env = "AZURE_TENANT_ID",
     .arg = "TENANT",
     .kind = OPT_STRING,
     .field = F(tenant_id, char *),
     .help = "tenant GUID or domain            {env}"},
    {.name = "token-file",
     .env = "AZURE_FEDERATED_TOKEN_FILE",
     .arg = "PATH",
     .kind = OPT_PATH,
     .field = F(token_file, char *),
     .help = "projected service-account token  {env}"},
    {.name = "authority-host",
     .env = "AZURE_AUTHORITY_HOST",
     .arg = "URL",
     .kind = OPT_CUSTOM,
     .parse = parse_authority,
     .def = CONFIG_DEFAULT_AUTHORITY,
     .help = "Entra authority, https only      {env}\n"
             "(default {default})"},
    {.name = "ca-file",
     .env = "IMDSD_CA_FILE",
     .arg = "PATH",
     .kind = OPT_PATH,
     .field = F(ca_file, char *),
     .def = CONFIG_DEFAULT_CA_FILE,
     .help = "trust anchors for Entra's TLS    {env}\n"
             "(default {default})"},
    {.name = "kubernetes-token-proxy",
     .env = "AZURE_KUBERNETES_TOKEN_PROXY",
     .arg = "URL",
     .kind = OPT_CUSTOM,
     .parse = parse_token_proxy,
     .help = "AKS identity binding: exchange tokens through this https\n"
             "proxy instead of the authority    {env}"},
    {.name = "kubernetes-sni-name",
     .env = "AZURE_KUBERNETES_SNI_NAME",
     .arg = "NAME",
     .kind = OPT_CUSTOM,
     .parse = parse_sni_name,
     .help = "the name the proxy's certificate is verified for and sent as\n"
             "SNI (default: its host)          {env}"},
    {.name = "kubernetes-ca-file",
     .env = "AZURE_KUBERNETES_CA_FILE",
     .arg = "PATH",
     .kind = OPT_PATH,
     .field = F(k8s_ca_file, char *),
     .help = "the proxy's only trust anchors, read again before every\n"
             "exchange                         {env}"},
    {.name = "kubernetes-ca-data",
     .env = "AZURE_KUBERNETES_CA_DATA",
     .arg = "PEM",
     .kind = OPT_STRING,
     .field = F(k8s_ca_data, char *),
     .help = "the same as PEM text             {env}"},
    {.name = "allow-client-id",
     .arg = "GUID",
     .kind = OPT_LIST,
     .field = F(allowed_client_ids, char **),
     .max = CONFIG_MAX_CLIENT_IDS,
     .count = F(nallowed, int),
     .noun = "identities",
     .valid = imds_is_guid,
     .why = "is not a GUID",
     .help = "another identity it may serve, repeatable"},
    {.name = "identity-alias",
     .arg = "ID=CLIENT_ID",
     .kind = OPT_CUSTOM,
     .parse = parse_alias,
     .max = CONFIG_MAX_ALIASES,
     .count = F(naliases, int),
     .noun = "aliases",
     .help = "serve CLIENT_ID for requests naming this object/principal id\n"
             "or ARM resource id, repeatable"},
    {.name = "allow-host",
     .arg = "NAME",
     .kind = OPT_LIST,
     .field = F(allowed_hosts, char **),
     .max = CONFIG_MAX_HOSTS,
     .count = F(nallowed_hosts, int),
     .noun = "names",
     .valid = valid_host_name,
     .why = "is not a host name (letters, digits, '-' and '.')",
     .help = "a host name token requests may use besides localhost and IP\n"
             "addresses, repeatable (others are refused: DNS rebinding)"},
    {.name = "allow-resource",
     .arg = "URI",
     .kind = OPT_LIST,
     .field = F(allowed_resources, char **),
     .max = CONFIG_MAX_RESOURCES,
     .count = F(nallowed_resources, int),
     .noun = "resources",
     .valid = imds_resource_pattern_ok,
     .why = "is not a resource URI (at most one '*', in the host name; no spaces)",
     .help = "serve tokens for this resource only, repeatable; one '*'\n"
             "stands for a host name part: https://*.vault.azure.net\n"
             "(default: every resource)"},
    {.name = "prefetch",
     .env = "IMDSD_PREFETCH",
     .arg = "[ID=]RESOURCE",
     .kind = OPT_CUSTOM,
     .parse = parse_prefetch,
     .help = "fetch this token at start, keep it fresh and never evict it;\n"
             "/readyz waits for it. ID: a client, object or ARM resource id\n"
             "(default: --client-id); repeatable, at most 16  {env}\n"
             "(the variable: several, separated by spaces or commas)"},
    {.name = "identity-header-file",
     .arg = "PATH",
     .kind = OPT_PATH,
     .field = F(identity_header_file, char *),
     .help = "enable the App Service endpoint /msi/token, authenticated by\n"
             "the secret in PATH sent as X-IDENTITY-HEADER"},
    {.name = "identity-header-overlap",
     .arg = "SEC",
     .kind = OPT_SECONDS,
     .field = F(identity_header_overlap_s, unsigned),
     .lo = 0,
     .hi = 86400,
     .def = "300",
     .help = "a rotated secret replaces the old one, which is still\n"
             "accepted this long (default {default})"},
    {.name = "arc-key-dir",
     .arg = "DIR",
     .kind = OPT_CUSTOM,
     .parse = parse_arc_dir,
     .help = "the Azure Arc challenge on the IMDS path: key files in DIR\n"
             "(/var/opt/azcmagent/tokens for every SDK), readable by"},
    {.name = "arc-key-group",
     .arg = "GROUP",
     .kind = OPT_CUSTOM,
     .parse = parse_arc_group,
     .help = "GROUP besides imdsd's user"},
    {.name = "log-level",
     .env = "IMDSD_LOG_LEVEL",
     .arg = "LEVEL",
     .kind = OPT_CUSTOM,
     .parse = parse_log_level,
     .def = "info",
     .expect = "debug, info, warn or error",
     .help = "debug, info, warn or error       {env} (default {default})"},
    {.name = "log-format",
     .env = "IMDSD_LOG_FORMAT",
     .arg = "FORMAT",
     .kind = OPT_CUSTOM,
     .parse = parse_log_format,
     .def = "logfmt",
     .expect = "logfmt or json",
     .help = "logfmt (default) or json         {env}"},
    {.name = "max-connections",
     .arg = "N",
     .kind = OPT_UINT,
     .field = F(max_connections, unsigned),
     .lo = 1,
     .hi = 65536,
     .def = "1024",
     .help = "concurrent client connections (default {default})"},
    {.name = "max-health-connections",
     .arg = "N",
     .kind = OPT_UINT,
     .field = F(max_health_connections, unsigned),
     .lo = 1,
     .hi = 65536,
     .def = "64",
     .help = "the same for --health-listen, a pool of its own (default {default})"},
    {.name = "idle-timeout",
     .arg = "SEC",
     .kind = OPT_SECONDS,
     .field = F(idle_timeout_s, unsigned),
     .lo = 1,
     .hi = 3600,
     .def = "60",
     .help = "close connections without a complete request (default {default})"},
    {.name = "header-timeout",
     .arg = "SEC",
     .kind = OPT_SECONDS,
     .field = F(header_timeout_s, unsigned),
     .lo = 1,
     .hi = 3600,
     .def = "10",
     .help = "a request must arrive whole within this (default {default})"},
    {.name = "entra-timeout",
     .arg = "SEC",
     .kind = OPT_SECONDS,
     .field = F(entra_timeout_s, unsigned),
     .lo = 1,
     .hi = 300,
     .def = "15",
     .help = "longest wait for a token that is not cached, retries included\n"
             "(default {default})"},
    {.name = "shutdown-grace",
     .arg = "SEC",
     .kind = OPT_SECONDS,
     .field = F(shutdown_grace_s, unsigned),
     .lo = 0,
     .hi = 60,
     .def = "5",
     .help = "on SIGTERM, time given to requests in flight (default {default})"},
    {.name = "add-loopback-address",
     .arg = "IPV4",
     .kind = OPT_CUSTOM,
     .parse = parse_add_address,
     .help = "one-shot init mode: add IPV4/32 to the loopback interface\n"
             "(e.g. 169.254.169.254; needs CAP_NET_ADMIN) and exit"},
    {.name = "probe",
     .arg = "[IP:PORT[/PATH]]",
     .optional = 1,
     .kind = OPT_CUSTOM,
     .parse = parse_probe_opt,
     .expect = "want IP:PORT or IP:PORT/PATH, e.g. 127.0.0.1:8000/readyz",
     .help = "exec probe: GET PATH (default /readyz) from a running imdsd,\n"
             "exit 0 on 200, else 1 with the reason (images without curl);\n"
             "alone: this imdsd's own, retried until ready (a postStart hook)"},
    {.name = "help", .kind = OPT_HELP},
    {.name = "version", .kind = OPT_VERSION},
};

#define NOPTS   (sizeof opts / sizeof *opts)
#define OPT_VAL 256 /* getopt_long's value for opts[i]: OPT_VAL + i, above every short option */

static void usage(void)
{
    fputs(USAGE_HEAD, stdout);
    for (size_t i = 0; i < NOPTS; i++) {
        const struct opt *o = &opts[i];
        if (!o->help)
            continue;
        int n = printf("  --%s%s%s", o->name, o->arg ? " " : "", o->arg ? o->arg : "");
        if (n > HELP_COL - 2)
            printf("\n%*s", HELP_COL, "");
        else
            printf("%*s", HELP_COL - n, "");
        for (const char *h = o->help; *h; h++) {
            if (*h == '\n') {
                printf("\n%*s", HELP_COL, "");
            } else if (strncmp(h, "{env}", 5) == 0) {
                printf("[%s]", o->env);
                h += 4;
            } else if (strncmp(h, "{default}", 9) == 0) {
                fputs(o->def, stdout);
                h += 8;
            } else {
                putchar(*h);
            }
        }
        putchar('\n');
    }
    fputs(USAGE_TAIL, stdout);
}

/* getopt_long's table, from opts[] */
static const struct option *long_options(void)
{
    static struct option lo[NOPTS + 1];
    for (size_t i = 0; i < NOPTS; i++)
        lo[i] = (struct option){opts[i].name,
                                opts[i].optional ? optional_argument
                                : opts[i].arg    ? required_argument
                                                 : no_argument,
                                NULL, OPT_VAL + (int)i};
    return lo;
}

/* Stores v, given as name, by o's kind: CONFIG_OK, CONFIG_EXIT or CONFIG_ERROR. */
static int apply(struct parse *p, const struct opt *o, const char *name, const char *v)
{
    char *field = (char *)p->c + o->field;
    int *count = o->max > 0 ? (int *)(void *)((char *)p->c + o->count) : NULL;
    if (count && *count >= o->max)
        return fail(p, "%s: at most %d %s", name, o->max, o->noun);
    switch (o->kind) {
    case OPT_PATH:
        if (!*v) /* a path is never empty (an empty variable counts as not set) */
            return fail(p, "%s: empty path", name);
        /* fall through */
    case OPT_STRING:
        set((char **)(void *)field, v);
        return CONFIG_OK;
    case OPT_UINT:
    case OPT_SECONDS:
        if (parse_uint(v, o->lo, o->hi, (unsigned *)(void *)field) < 0)
            return invalid(p, o, name, v);
        return CONFIG_OK;
    case OPT_LIST:
        if (!o->valid(v))
            return bad(p, name, v, o->why);
        ((char **)(void *)field)[(*count)++] = xstrdup(v);
        return CONFIG_OK;
    case OPT_CUSTOM:
        return o->parse(p, o, name, v);
    case OPT_HELP:
        usage();
        return CONFIG_EXIT;
    case OPT_VERSION:
        printf("imdsd %s\n", IMDSD_VERSION);
        return CONFIG_EXIT;
    }
    return CONFIG_ERROR;
}

/* Stores v given as --NAME (or as its default): CONFIG_OK, CONFIG_EXIT or CONFIG_ERROR. */
static int apply_flag(struct parse *p, const struct opt *o, const char *v)
{
    char name[32];
    snprintf(name, sizeof name, "--%s", o->name);
    return apply(p, o, name, v);
}

/* The checks across options, once all are read; and what follows from them. */
static int finish(struct parse *p, config_getenv_fn *getenv_fn)
{
    struct config *c = p->c;
    const char *v, *why = NULL;
    if (c->probe == 2) { /* its own /readyz: the first address serving tokens (the default) */
        c->probe_at = (struct config_listen){.port = 0};
        for (int i = 0; i < c->nlisten && !c->probe_at.port; i++)
            if (!c->listen[i].health)
                c->probe_at = c->listen[i];
        if (!c->probe_at.port)
            config_parse_listen(CONFIG_DEFAULT_LISTEN, &c->probe_at);
        strcpy(c->probe_path, "/readyz");
    }
    if (c->add_address[0] || c->probe)
        return CONFIG_OK; /* the one-shot modes need no identity */
    if (!c->client_id)
        return fail(p, "AZURE_CLIENT_ID / --client-id: not set");
    if (!imds_is_guid(c->client_id))
        return fail(p, "AZURE_CLIENT_ID / --client-id: '%s' is not a GUID", c->client_id);
    if (!c->tenant_id)
        return fail(p, "AZURE_TENANT_ID / --tenant-id: not set");
    if (!valid_tenant(c->tenant_id))
        return fail(p, "AZURE_TENANT_ID / --tenant-id: '%s' is not a GUID or domain name",
                    c->tenant_id);
    if (!c->token_file)
        return fail(p, "AZURE_FEDERATED_TOKEN_FILE / --token-file: not set");
    if (config_set_authority(c, p->authority, &why) < 0)
        return fail(p, "%s: '%s' %s", p->authority_src, p->authority, why);
    /* azidentity's rules (customtokenproxy.Apply): the other three need the proxy, one CA */
    if (!c->token_proxy.url) {
        if (c->sni_name)
            return fail(p,
                        "AZURE_KUBERNETES_SNI_NAME / --kubernetes-sni-name: '%s' is set but "
                        "AZURE_KUBERNETES_TOKEN_PROXY is not",
                        c->sni_name);
        if (c->k8s_ca_file)
            return fail(p,
                        "AZURE_KUBERNETES_CA_FILE / --kubernetes-ca-file: '%s' is set but "
                        "AZURE_KUBERNETES_TOKEN_PROXY is not",
                        c->k8s_ca_file);
        if (c->k8s_ca_data)
            return fail(p,
                        "AZURE_KUBERNETES_CA_DATA / --kubernetes-ca-data: set (%zu bytes) but "
                        "AZURE_KUBERNETES_TOKEN_PROXY is not",
                        strlen(c->k8s_ca_data));
    }
    if (c->k8s_ca_file && c->k8s_ca_data)
        return fail(p,
                    "AZURE_KUBERNETES_CA_FILE ('%s') and AZURE_KUBERNETES_CA_DATA (%zu bytes) "
                    "are both set: set one",
                    c->k8s_ca_file, strlen(c->k8s_ca_data));
    /* where the exchange goes: the proxy decides whether HTTPS_PROXY applies, as in Go */
    const char *dest_host = c->token_proxy.url ? c->token_proxy.host : c->authority_host;
    const char *dest_port = c->token_proxy.url ? c->token_proxy.port : c->authority_port;
    /* Go's order: the upper-case variable first, the first one set and not empty wins */
    const char *proxy_src = "HTTPS_PROXY", *no_proxy = getenv_fn("NO_PROXY");
    if (!(v = getenv_fn("HTTPS_PROXY")) || !*v) {
        v = getenv_fn("https_proxy");
        proxy_src = "https_proxy";
    }
    if (!no_proxy || !*no_proxy)
        no_proxy = getenv_fn("no_proxy");
    if (v && *v) {
        char redacted[512];
        if (proxy_parse(&c->proxy, v, &why) < 0)
            return fail(p, "%s: '%s' %s", proxy_src, proxy_redact(v, redacted, sizeof redacted),
                        why);
        if (no_proxy && *no_proxy && proxy_bypass(no_proxy, dest_host, dest_port))
            proxy_free(&c->proxy);
        else
            c->use_proxy = 1;
    }
    for (int i = 0; i < c->naliases; i++) {
        const char *id = c->aliases[i].client_id;
        int ok = strcasecmp(id, c->client_id) == 0;
        for (int k = 0; k < c->nallowed && !ok; k++)
            ok = strcasecmp(id, c->allowed_client_ids[k]) == 0;
        if (!ok)
            return fail(p,
                        "--identity-alias: client id '%s' is neither --client-id nor an "
                        "--allow-client-id",
                        id);
    }
    struct imds_identities ids = config_identities(c);
    for (int i = 0; i < c->nprefetch; i++) {
        struct config_prefetch *f = &c->prefetch[i];
        char given[2400];
        snprintf(given, sizeof given, "%s%s%s", f->id ? f->id : "", f->id ? "=" : "", f->resource);
        f->client_id = f->id ? imds_resolve_identity(&ids, f->id) : c->client_id;
        if (!f->client_id)
            return fail(p,
                        "--prefetch / IMDSD_PREFETCH: '%s' names an identity imdsd does not serve "
                        "(not --client-id, an --allow-client-id or an --identity-alias)",
                        given);
        if (!imds_resource_allowed(f->resource, strlen(f->resource), c->allowed_resources,
                                   c->nallowed_resources))
            return fail(p,
                        "--prefetch / IMDSD_PREFETCH: '%s' is a resource --allow-resource refuses",
                        given);
        for (int k = 0; k < i; k++)
            if (strcasecmp(c->prefetch[k].client_id, f->client_id) == 0 &&
                strcmp(c->prefetch[k].resource, f->resource) == 0)
                return fail(p, "--prefetch / IMDSD_PREFETCH: '%s' is given twice", given);
    }
    int ntoken = 0;
    for (int i = 0; i < c->nlisten; i++) {
        char addr[CONFIG_LISTEN_STR];
        ntoken += !c->listen[i].health;
        for (int k = 0; k < i; k++)
            if (c->listen[k].port == c->listen[i].port &&
                strcmp(c->listen[k].host, c->listen[i].host) == 0)
                return fail(p, "%s: %s is given twice",
                            c->listen[i].health ? "--health-listen" : "--listen",
                            config_listen_str(&c->listen[i], addr));
    }
    if (ntoken == 0) { /* --listen's default, when no address serves tokens */
        if (c->nlisten >= CONFIG_MAX_LISTEN)
            return fail(p, "--health-listen: at most %d addresses with the default --listen",
                        CONFIG_MAX_LISTEN - 1);
        config_parse_listen(CONFIG_DEFAULT_LISTEN, &c->listen[c->nlisten]);
        c->listen[c->nlisten++].health = 0;
    }
    return CONFIG_OK;
}

static int parse_argv(struct parse *p, int argc, char **argv, unsigned char *seen);

int config_parse(struct config *c, int argc, char **argv, config_getenv_fn *getenv_fn, char *err,
                 size_t errlen)
{
    struct parse p = {.c = c, .err = err, .errlen = errlen};
    unsigned char seen[NOPTS] = {0};
    const char *v;
    int rc;
    memset(c, 0, sizeof *c);
    c->arc_gid = -1;                   /* no --arc-key-group */
    for (size_t i = 0; i < NOPTS; i++) /* a repeatable option's default stands for none given */
        if (opts[i].def && opts[i].max == 0 && (rc = apply_flag(&p, &opts[i], opts[i].def)))
            return rc;

    /* "--probe ADDR" as two words is "--probe=ADDR" (getopt takes an optional argument only in
     * the one word), so that "--probe" alone, the proxy sidecar's postStart hook, can stand last */
    char **av = xcalloc((size_t)argc + 1, sizeof *av),
         **joined = xcalloc((size_t)argc + 1, sizeof *av);
    int ac = 0, nj = 0;
    for (int i = 0; i < argc; i++) {
        if (i > 0 && strcmp(argv[i], "--probe") == 0 && i + 1 < argc && argv[i + 1][0] != '-') {
            size_t n = strlen(argv[i + 1]) + sizeof "--probe=";
            av[ac] = joined[nj++] = xcalloc(n, 1);
            snprintf(av[ac++], n, "--probe=%s", argv[++i]);
        } else {
            av[ac++] = argv[i];
        }
    }
    rc = parse_argv(&p, ac, av, seen);
    while (nj > 0)
        free(joined[--nj]);
    free(joined);
    free(av);
    if (rc)
        return rc;
    for (size_t i = 0; i < NOPTS; i++) /* the environment, where the flag is not given */
        if (opts[i].env && !seen[i] && (v = getenv_fn(opts[i].env)) && *v &&
            (rc = apply(&p, &opts[i], opts[i].env, v)))
            return rc;
    return finish(&p, getenv_fn);
}

/* The flags: CONFIG_OK, CONFIG_EXIT or CONFIG_ERROR; seen[i] set for each opts[i] given. */
static int parse_argv(struct parse *p, int argc, char **argv, unsigned char *seen)
{
    int rc, opt, li = -1;
    optind = 0; /* glibc: a full restart, nothing kept from an earlier argv (tests parse many) */
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":", long_options(), &li)) != -1) {
        if (opt >= OPT_VAL) {
            seen[opt - OPT_VAL] = 1;
            if ((rc = apply_flag(p, &opts[opt - OPT_VAL], optarg)))
                return rc;
        } else if (opt == ':') {
            return fail(p, "%s: missing value", argv[optind - 1]);
        } else if (optopt != 0 && optopt < OPT_VAL) { /* "-x", perhaps inside "-xy" */
            return fail(p, "-%c: unknown option (see --help)", optopt);
        } else {
            return fail(p, "%s: unknown option (see --help)", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return fail(p, "%s: unexpected argument (see --help)", argv[optind]);
    return CONFIG_OK;
}

void config_free(struct config *c)
{
    free(c->client_id);
    free(c->tenant_id);
    free(c->token_file);
    free(c->authority);
    free(c->authority_host);
    free(c->authority_path);
    free(c->ca_file);
    config_url_free(&c->token_proxy);
    free(c->token_proxy_src);
    free(c->sni_name);
    free(c->k8s_ca_file);
    free(c->k8s_ca_data);
    for (int i = 0; i < c->nallowed; i++)
        free(c->allowed_client_ids[i]);
    for (int i = 0; i < c->nallowed_hosts; i++)
        free(c->allowed_hosts[i]);
    for (int i = 0; i < c->nallowed_resources; i++)
        free(c->allowed_resources[i]);
    for (int i = 0; i < c->nprefetch; i++) {
        free(c->prefetch[i].id);
        free(c->prefetch[i].resource);
    }
    for (int i = 0; i < c->naliases; i++) {
        free(c->aliases[i].key);
        free(c->aliases[i].client_id);
    }
    proxy_free(&c->proxy);
    free(c->identity_header_file);
    free(c->arc_key_dir);
    if (c->identity_header) {
        secret_zero(c->identity_header, c->identity_header_len);
        free(c->identity_header);
    }
    memset(c, 0, sizeof *c);
}
