#include "config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "imds.h"
#include "util.h"

static const char USAGE[] =
    "Usage: imdsd [OPTIONS]\n"
    "Serves Entra ID access tokens for a Kubernetes workload identity on a local\n"
    "IMDS-compatible endpoint (GET /metadata/identity/oauth2/token).\n"
    "\n"
    "  --listen ADDR:PORT      address to serve on, repeatable (default " CONFIG_DEFAULT_LISTEN
    ";\n"
    "                          IPv6 as [::1]:8000)\n"
    "  --health-listen ADDR:PORT\n"
    "                          also serve /healthz and /readyz (and never a token) here, for\n"
    "                          the kubelet's probes, e.g. 0.0.0.0:8001; repeatable\n"
    "  --client-id GUID        default identity                [AZURE_CLIENT_ID]\n"
    "  --tenant-id TENANT      tenant GUID or domain            [AZURE_TENANT_ID]\n"
    "  --token-file PATH       projected service-account token  [AZURE_FEDERATED_TOKEN_FILE]\n"
    "  --authority-host URL    Entra authority, https only      [AZURE_AUTHORITY_HOST]\n"
    "                          (default " CONFIG_DEFAULT_AUTHORITY ")\n"
    "  --ca-file PATH          trust anchors for Entra's TLS    [IMDSD_CA_FILE]\n"
    "                          (default " CONFIG_DEFAULT_CA_FILE ")\n"
    "  --allow-client-id GUID  another identity it may serve, repeatable\n"
    "  --identity-alias ID=CLIENT_ID\n"
    "                          serve CLIENT_ID for requests naming this object/principal id\n"
    "                          or ARM resource id, repeatable\n"
    "  --allow-host NAME       a host name token requests may use besides localhost and IP\n"
    "                          addresses, repeatable (others are refused: DNS rebinding)\n"
    "  --allow-resource URI    serve tokens for this resource only, repeatable; one '*'\n"
    "                          stands for a host name part: https://*.vault.azure.net\n"
    "                          (default: every resource)\n"
    "  --identity-header-file PATH\n"
    "                          enable the App Service endpoint /msi/token, authenticated by\n"
    "                          the secret in PATH sent as X-IDENTITY-HEADER\n"
    "  --identity-header-overlap SEC\n"
    "                          a rotated secret replaces the old one, which is still\n"
    "                          accepted this long (default 300)\n"
    "  --arc-key-dir DIR       the Azure Arc challenge on the IMDS path: key files in DIR\n"
    "                          (/var/opt/azcmagent/tokens for every SDK), readable by\n"
    "  --arc-key-group GROUP   GROUP besides imdsd's user\n"

    "  --log-level LEVEL       debug, info, warn or error       [IMDSD_LOG_LEVEL] (default info)\n"
    "  --log-format FORMAT     logfmt (default) or json         [IMDSD_LOG_FORMAT]\n"
    "  --max-connections N     concurrent client connections (default 1024)\n"
    "  --max-health-connections N\n"
    "                          the same for --health-listen, a pool of its own (default 64)\n"
    "  --idle-timeout SEC      close connections without a complete request (default 60)\n"
    "  --header-timeout SEC    a request must arrive whole within this (default 10)\n"

    "  --entra-timeout SEC     longest wait for a token that is not cached, retries included\n"
    "                          (default 15)\n"
    "  --shutdown-grace SEC    on SIGTERM, time given to requests in flight (default 5)\n"
    "  --add-loopback-address IPV4\n"
    "                          one-shot init mode: add IPV4/32 to the loopback interface\n"
    "                          (e.g. 169.254.169.254; needs CAP_NET_ADMIN) and exit\n"
    "  --probe IP:PORT[/PATH]  exec probe: GET PATH (default /readyz) from a running imdsd,\n"
    "                          exit 0 on 200, else 1 with the reason (images without curl)\n"
    "  --help, --version\n"
    "\n"
    "Entra is reached through the HTTP CONNECT proxy in HTTPS_PROXY (or https_proxy), unless\n"
    "NO_PROXY (or no_proxy) names the authority host.\n";

enum {
    OPT_LISTEN = 256,
    OPT_HEALTH_LISTEN,
    OPT_CLIENT_ID,
    OPT_TENANT_ID,
    OPT_TOKEN_FILE,
    OPT_AUTHORITY,
    OPT_CA_FILE,
    OPT_ALLOW,
    OPT_ALIAS,
    OPT_ALLOW_HOST,
    OPT_ALLOW_RESOURCE,
    OPT_IDENTITY_HEADER_FILE,
    OPT_LOG_LEVEL,
    OPT_LOG_FORMAT,
    OPT_MAX_CONN,
    OPT_MAX_HEALTH_CONN,
    OPT_IDLE,
    OPT_HEADER_TIMEOUT,
    OPT_ENTRA_TIMEOUT,
    OPT_GRACE,
    OPT_OVERLAP,
    OPT_ARC_DIR,
    OPT_ARC_GROUP,
    OPT_ADD_ADDRESS,
    OPT_PROBE,
    OPT_HELP,
    OPT_VERSION,
};

static const struct option options[] = {
    {"listen", required_argument, NULL, OPT_LISTEN},
    {"health-listen", required_argument, NULL, OPT_HEALTH_LISTEN},
    {"client-id", required_argument, NULL, OPT_CLIENT_ID},
    {"tenant-id", required_argument, NULL, OPT_TENANT_ID},
    {"token-file", required_argument, NULL, OPT_TOKEN_FILE},
    {"authority-host", required_argument, NULL, OPT_AUTHORITY},
    {"ca-file", required_argument, NULL, OPT_CA_FILE},
    {"allow-client-id", required_argument, NULL, OPT_ALLOW},
    {"identity-alias", required_argument, NULL, OPT_ALIAS},
    {"allow-host", required_argument, NULL, OPT_ALLOW_HOST},
    {"allow-resource", required_argument, NULL, OPT_ALLOW_RESOURCE},
    {"identity-header-file", required_argument, NULL, OPT_IDENTITY_HEADER_FILE},
    {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
    {"log-format", required_argument, NULL, OPT_LOG_FORMAT},
    {"max-connections", required_argument, NULL, OPT_MAX_CONN},
    {"max-health-connections", required_argument, NULL, OPT_MAX_HEALTH_CONN},
    {"idle-timeout", required_argument, NULL, OPT_IDLE},
    {"header-timeout", required_argument, NULL, OPT_HEADER_TIMEOUT},
    {"entra-timeout", required_argument, NULL, OPT_ENTRA_TIMEOUT},
    {"shutdown-grace", required_argument, NULL, OPT_GRACE},
    {"identity-header-overlap", required_argument, NULL, OPT_OVERLAP},
    {"arc-key-dir", required_argument, NULL, OPT_ARC_DIR},
    {"arc-key-group", required_argument, NULL, OPT_ARC_GROUP},
    {"add-loopback-address", required_argument, NULL, OPT_ADD_ADDRESS},
    {"probe", required_argument, NULL, OPT_PROBE},
    {"help", no_argument, NULL, OPT_HELP},
    {"version", no_argument, NULL, OPT_VERSION},
    {NULL, 0, NULL, 0},
};

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

int config_set_authority(struct config *c, const char *url, const char **why)
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
    const char *slash = memchr(host, '/', (size_t)(end - host));
    const char *hend = slash ? slash : end;
    const char *port = NULL;
    char hbuf[256];
    size_t hlen;
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
    if (port) {
        size_t plen = (size_t)(hend - port);
        if (plen == 0 || plen > 5)
            goto badport;
        for (size_t i = 0; i < plen; i++)
            if (!isdigit((unsigned char)port[i]))
                goto badport;
        memcpy(c->authority_port, port, plen);
        c->authority_port[plen] = 0;
        long p = atol(c->authority_port);
        if (p < 1 || p > 65535)
            goto badport;
    } else {
        strcpy(c->authority_port, "443");
    }
    for (const char *q = hend; q < end; q++)
        if ((unsigned char)*q <= ' ' || *q == '?' || *q == '#') {
            *why = "has a query, fragment or space in its path";
            return -1;
        }
    free(c->authority);
    free(c->authority_host);
    free(c->authority_path);
    c->authority = xstrndup(url, n);
    c->authority_host = xstrdup(hbuf);
    c->authority_path = xstrndup(hend, (size_t)(end - hend));
    return 0;
badhost:
    *why = "has no valid host name";
    return -1;
badport:
    *why = "has an invalid port";
    return -1;
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

#define ERR(...)                                                                                   \
    do {                                                                                           \
        snprintf(err, errlen, __VA_ARGS__);                                                        \
        one_line(err, errlen);                                                                     \
        return CONFIG_ERROR;                                                                       \
    } while (0)

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

int config_parse(struct config *c, int argc, char **argv, config_getenv_fn *getenv_fn, char *err,
                 size_t errlen)
{
    memset(c, 0, sizeof *c);
    c->log_level = LOG_INFO;
    c->max_connections = 1024;
    c->max_health_connections = 64;
    c->idle_timeout_s = 60;
    c->header_timeout_s = 10;
    c->entra_timeout_s = 15;
    c->shutdown_grace_s = 5;
    c->identity_header_overlap_s = 300;
    c->arc_gid = -1;
    const char *v, *why = NULL;
    const char *authority = CONFIG_DEFAULT_AUTHORITY, *authority_src = "AZURE_AUTHORITY_HOST";

    if ((v = getenv_fn("AZURE_CLIENT_ID")) && *v)
        set(&c->client_id, v);
    if ((v = getenv_fn("AZURE_TENANT_ID")) && *v)
        set(&c->tenant_id, v);
    if ((v = getenv_fn("AZURE_FEDERATED_TOKEN_FILE")) && *v)
        set(&c->token_file, v);
    if ((v = getenv_fn("AZURE_AUTHORITY_HOST")) && *v)
        authority = v;
    if ((v = getenv_fn("IMDSD_CA_FILE")) && *v)
        set(&c->ca_file, v);
    const char *env_level = getenv_fn("IMDSD_LOG_LEVEL");
    const char *env_format = getenv_fn("IMDSD_LOG_FORMAT");
    int level_flag = 0, format_flag = 0;

    optind = 0; /* glibc: a full restart, nothing kept from an earlier argv (tests parse many) */
    opterr = 0;
    int opt, li = -1;
    while ((opt = getopt_long(argc, argv, ":", options, &li)) != -1) {
        switch (opt) {
        case OPT_LISTEN:
        case OPT_HEALTH_LISTEN: {
            const char *name = opt == OPT_LISTEN ? "--listen" : "--health-listen";
            if (c->nlisten >= CONFIG_MAX_LISTEN)
                ERR("%s: at most %d addresses with --listen and --health-listen", name,
                    CONFIG_MAX_LISTEN);
            if (config_parse_listen(optarg, &c->listen[c->nlisten]) < 0)
                ERR("%s: invalid address '%s' (want IP:PORT or [IPv6]:PORT)", name, optarg);
            c->listen[c->nlisten++].health = opt == OPT_HEALTH_LISTEN;
            break;
        }
        case OPT_CLIENT_ID:
            set(&c->client_id, optarg);
            break;
        case OPT_TENANT_ID:
            set(&c->tenant_id, optarg);
            break;
        case OPT_TOKEN_FILE:
            if (!*optarg) /* a path is never empty (an empty variable counts as not set) */
                ERR("--token-file: empty path");
            set(&c->token_file, optarg);
            break;
        case OPT_AUTHORITY:
            authority = optarg;
            authority_src = "--authority-host";
            break;
        case OPT_CA_FILE:
            if (!*optarg) /* a path is never empty (an empty variable counts as not set) */
                ERR("--ca-file: empty path");
            set(&c->ca_file, optarg);
            break;
        case OPT_ALLOW:
            if (c->nallowed >= CONFIG_MAX_CLIENT_IDS)
                ERR("--allow-client-id: at most %d identities", CONFIG_MAX_CLIENT_IDS);
            if (!imds_is_guid(optarg))
                ERR("--allow-client-id: '%s' is not a GUID", optarg);
            c->allowed_client_ids[c->nallowed++] = xstrdup(optarg);
            break;
        case OPT_ALIAS: {
            const char *eq = strrchr(optarg, '=');
            if (c->naliases >= CONFIG_MAX_ALIASES)
                ERR("--identity-alias: at most %d aliases", CONFIG_MAX_ALIASES);
            if (!eq || !imds_is_guid(eq + 1))
                ERR("--identity-alias: '%s' is not ID=CLIENT_ID with a GUID client id", optarg);
            struct imds_alias *a = &c->aliases[c->naliases];
            a->key = xstrndup(optarg, (size_t)(eq - optarg));
            a->client_id = xstrdup(eq + 1);
            c->naliases++;
            if (!imds_is_guid(a->key) && !imds_is_resource_id(a->key))
                ERR("--identity-alias: '%s' is neither an object id (GUID) nor an ARM resource id "
                    "(/subscriptions/...)",
                    a->key);
            break;
        }
        case OPT_ALLOW_RESOURCE:
            if (c->nallowed_resources >= CONFIG_MAX_RESOURCES)
                ERR("--allow-resource: at most %d resources", CONFIG_MAX_RESOURCES);
            if (!imds_resource_pattern_ok(optarg))
                ERR("--allow-resource: '%s' is not a resource URI (at most one '*', in the host "
                    "name; no spaces)",
                    optarg);
            c->allowed_resources[c->nallowed_resources++] = xstrdup(optarg);
            break;
        case OPT_ALLOW_HOST:
            if (c->nallowed_hosts >= CONFIG_MAX_HOSTS)
                ERR("--allow-host: at most %d names", CONFIG_MAX_HOSTS);
            if (!valid_host_name(optarg))
                ERR("--allow-host: '%s' is not a host name (letters, digits, '-' and '.')", optarg);
            c->allowed_hosts[c->nallowed_hosts++] = xstrdup(optarg);
            break;
        case OPT_IDENTITY_HEADER_FILE:
            if (!*optarg) /* a path is never empty (an empty variable counts as not set) */
                ERR("--identity-header-file: empty path");
            set(&c->identity_header_file, optarg);
            break;
        case OPT_LOG_LEVEL:
            if (log_level_parse(optarg, &c->log_level) < 0)
                ERR("--log-level: invalid value '%s' (debug, info, warn or error)", optarg);
            level_flag = 1;
            break;
        case OPT_LOG_FORMAT:
            if (log_format_parse(optarg, &c->log_format) < 0)
                ERR("--log-format: invalid value '%s' (logfmt or json)", optarg);
            format_flag = 1;
            break;
        case OPT_MAX_CONN:
            if (parse_uint(optarg, 1, 65536, &c->max_connections) < 0)
                ERR("--max-connections: invalid value '%s' (1 to 65536)", optarg);
            break;
        case OPT_MAX_HEALTH_CONN:
            if (parse_uint(optarg, 1, 65536, &c->max_health_connections) < 0)
                ERR("--max-health-connections: invalid value '%s' (1 to 65536)", optarg);
            break;
        case OPT_HEADER_TIMEOUT:
            if (parse_uint(optarg, 1, 3600, &c->header_timeout_s) < 0)
                ERR("--header-timeout: invalid value '%s' (1 to 3600 seconds)", optarg);
            break;
        case OPT_IDLE:
            if (parse_uint(optarg, 1, 3600, &c->idle_timeout_s) < 0)
                ERR("--idle-timeout: invalid value '%s' (1 to 3600 seconds)", optarg);
            break;
        case OPT_ENTRA_TIMEOUT:
            if (parse_uint(optarg, 1, 300, &c->entra_timeout_s) < 0)
                ERR("--entra-timeout: invalid value '%s' (1 to 300 seconds)", optarg);
            break;
        case OPT_ARC_DIR:
            if (optarg[0] != '/' || strlen(optarg) > 200)
                ERR("--arc-key-dir: '%s' is not an absolute path of at most 200 bytes", optarg);
            set(&c->arc_key_dir, optarg);
            break;
        case OPT_ARC_GROUP: {
            unsigned gid;
            if (parse_uint(optarg, 0, 0x7fffffff, &gid) == 0) {
                c->arc_gid = (long)gid;
                break;
            }
            const struct group *g = getgrnam(optarg);
            if (!g)
                ERR("--arc-key-group: '%s' is neither a known group nor a number", optarg);
            c->arc_gid = (long)g->gr_gid;
            break;
        }
        case OPT_OVERLAP:
            if (parse_uint(optarg, 0, 86400, &c->identity_header_overlap_s) < 0)
                ERR("--identity-header-overlap: invalid value '%s' (0 to 86400 seconds)", optarg);
            break;
        case OPT_GRACE:
            if (parse_uint(optarg, 0, 60, &c->shutdown_grace_s) < 0)
                ERR("--shutdown-grace: invalid value '%s' (0 to 60 seconds)", optarg);
            break;
        case OPT_ADD_ADDRESS: {
            struct in_addr a;
            if (strlen(optarg) >= sizeof c->add_address || inet_pton(AF_INET, optarg, &a) != 1)
                ERR("--add-loopback-address: '%s' is not an IPv4 address", optarg);
            strcpy(c->add_address, optarg);
            break;
        }
        case OPT_PROBE:
            if (parse_probe(c, optarg) < 0)
                ERR("--probe: invalid value '%s' (want IP:PORT or IP:PORT/PATH, e.g. "
                    "127.0.0.1:8000/readyz)",
                    optarg);
            break;
        case OPT_HELP:
            fputs(USAGE, stdout);
            return CONFIG_EXIT;
        case OPT_VERSION:
            printf("imdsd %s\n", IMDSD_VERSION);
            return CONFIG_EXIT;
        case ':':
            ERR("%s: missing value", argv[optind - 1]);
        default:
            if (optopt != 0 && optopt < OPT_LISTEN) /* "-x", perhaps inside "-xy" */
                ERR("-%c: unknown option (see --help)", optopt);
            ERR("%s: unknown option (see --help)", argv[optind - 1]);
        }
    }
    if (optind < argc)
        ERR("%s: unexpected argument (see --help)", argv[optind]);

    if (!level_flag && env_level && *env_level && log_level_parse(env_level, &c->log_level) < 0)
        ERR("IMDSD_LOG_LEVEL: invalid value '%s' (debug, info, warn or error)", env_level);
    if (!format_flag && env_format && *env_format &&
        log_format_parse(env_format, &c->log_format) < 0)
        ERR("IMDSD_LOG_FORMAT: invalid value '%s' (logfmt or json)", env_format);
    if (c->add_address[0] || c->probe)
        return CONFIG_OK; /* the one-shot modes need no identity */
    if (!c->client_id)
        ERR("AZURE_CLIENT_ID / --client-id: not set");
    if (!imds_is_guid(c->client_id))
        ERR("AZURE_CLIENT_ID / --client-id: '%s' is not a GUID", c->client_id);
    if (!c->tenant_id)
        ERR("AZURE_TENANT_ID / --tenant-id: not set");
    if (!valid_tenant(c->tenant_id))
        ERR("AZURE_TENANT_ID / --tenant-id: '%s' is not a GUID or domain name", c->tenant_id);
    if (!c->token_file)
        ERR("AZURE_FEDERATED_TOKEN_FILE / --token-file: not set");
    if (config_set_authority(c, authority, &why) < 0)
        ERR("%s: '%s' %s", authority_src, authority, why);
    if (!c->ca_file)
        c->ca_file = xstrdup(CONFIG_DEFAULT_CA_FILE);
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
            ERR("%s: '%s' %s", proxy_src, proxy_redact(v, redacted, sizeof redacted), why);
        if (no_proxy && *no_proxy && proxy_bypass(no_proxy, c->authority_host, c->authority_port))
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
            ERR("--identity-alias: client id '%s' is neither --client-id nor an --allow-client-id",
                id);
    }
    int ntoken = 0;
    for (int i = 0; i < c->nlisten; i++) {
        char addr[CONFIG_LISTEN_STR];
        ntoken += !c->listen[i].health;
        for (int k = 0; k < i; k++)
            if (c->listen[k].port == c->listen[i].port &&
                strcmp(c->listen[k].host, c->listen[i].host) == 0)
                ERR("%s: %s is given twice", c->listen[i].health ? "--health-listen" : "--listen",
                    config_listen_str(&c->listen[i], addr));
    }
    if (ntoken == 0) {
        if (c->nlisten >= CONFIG_MAX_LISTEN)
            ERR("--health-listen: at most %d addresses with the default --listen",
                CONFIG_MAX_LISTEN - 1);
        config_parse_listen(CONFIG_DEFAULT_LISTEN, &c->listen[c->nlisten]);
        c->listen[c->nlisten++].health = 0;
    }
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
    for (int i = 0; i < c->nallowed; i++)
        free(c->allowed_client_ids[i]);
    for (int i = 0; i < c->nallowed_hosts; i++)
        free(c->allowed_hosts[i]);
    for (int i = 0; i < c->nallowed_resources; i++)
        free(c->allowed_resources[i]);
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
