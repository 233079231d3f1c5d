#include "proxy.h"

#include <arpa/inet.h>
#include <mbedtls/base64.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "util.h"

#define PROXY_PORT_DIGITS 5
#define PROXY_PORT_MAX    65535
#define PROXY_SCHEME_MAX  16
#define PROXY_ENTRY_MAX   300 /* a NO_PROXY entry longer than this cannot match anything */
#define PROXY_ADDR_MAX    16  /* bytes of an IPv6 address */
#define PROXY_BASIC       "Basic "
#define PROXY_MASK        "***"

static int is_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n' || ch == '\f' || ch == '\v';
}

static int is_alpha(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

static int is_digit(char ch)
{
    return ch >= '0' && ch <= '9';
}

static char lower(char ch)
{
    return ch >= 'A' && ch <= 'Z' ? (char)(ch - 'A' + 'a') : ch;
}

static int hex_value(char ch)
{
    if (is_digit(ch))
        return ch - '0';
    ch = lower(ch);
    return ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

/* A port number of 1..5 digits in [s, s + n), 1..65535; -1 otherwise. */
static long port_value(const char *s, size_t n)
{
    long v = 0;
    if (n == 0 || n > PROXY_PORT_DIGITS)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (!is_digit(s[i]))
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v >= 1 && v <= PROXY_PORT_MAX ? v : -1;
}

/* Percent-decodes [s, s + n) into out (room for cap bytes + NUL). Returns the decoded length, or
 * -1 for a bad escape, an encoded NUL, or more than cap bytes. */
static long pct_decode(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (ch == '%') {
            if (i + 2 >= n)
                return -1; /* fewer than two characters follow */
            int hi = hex_value(s[i + 1]), lo = hex_value(s[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
                return -1;
            ch = (char)(hi * 16 + lo);
            i += 2;
        }
        if (o >= cap)
            return -1;
        out[o++] = ch;
    }
    out[o] = 0;
    return (long)o;
}

static int host_char_ok(char ch)
{
    return is_alpha(ch) || is_digit(ch) || ch == '-' || ch == '.' || ch == '_';
}

/* Appends [s, s + n) percent-encoded except for unreserved characters. */
static void pct_encode(char *out, size_t *o, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (is_alpha((char)ch) || is_digit((char)ch) || ch == '-' || ch == '.' || ch == '_' ||
            ch == '~') {
            out[(*o)++] = (char)ch;
        } else {
            out[(*o)++] = '%';
            out[(*o)++] = hex[ch >> 4];
            out[(*o)++] = hex[ch & 15];
        }
    }
}

/* "Basic " + base64(user ":" password), or NULL if mbedTLS refuses (it cannot, sizes are fine). */
static char *basic_credentials(const char *user, size_t ulen, const char *pass, size_t plen)
{
    size_t n = ulen + 1 + plen;
    unsigned char *raw = xmalloc(n);
    memcpy(raw, user, ulen);
    raw[ulen] = ':';
    memcpy(raw + ulen + 1, pass, plen);
    size_t b64 = 4 * ((n + 2) / 3) + 1;
    size_t prefix = sizeof PROXY_BASIC - 1;
    char *out = xmalloc(prefix + b64);
    size_t olen = 0;
    memcpy(out, PROXY_BASIC, prefix);
    int r = mbedtls_base64_encode((unsigned char *)out + prefix, b64, &olen, raw, n);
    secret_zero(raw, n);
    free(raw);
    if (r != 0) {
        secret_zero(out, prefix + b64);
        free(out);
        return NULL;
    }
    out[prefix + olen] = 0;
    return out;
}

static int fail(struct proxy *p, const char **why, const char *reason)
{
    proxy_free(p);
    *why = reason;
    return -1;
}

int proxy_parse(struct proxy *p, const char *url, const char **why)
{
    char user[PROXY_CRED_MAX + 1], pass[PROXY_CRED_MAX + 1];
    long ulen = -1, plen = 0;
    const char *reason = NULL;

    memset(p, 0, sizeof *p);
    if (!url)
        return fail(p, why, "is empty");
    const char *s = url, *e = url + strlen(url);
    while (s < e && is_space(*s))
        s++;
    while (e > s && is_space(e[-1]))
        e--;
    if (s == e)
        return fail(p, why, "is empty");
    if ((size_t)(e - s) > PROXY_URL_MAX)
        return fail(p, why, "is too long");
    for (const char *q = s; q < e; q++) {
        if ((unsigned char)*q <= ' ' || (unsigned char)*q >= 0x7f)
            return fail(p, why, "contains spaces or control characters");
    }

    /* Scheme: "http://", or none (taken as http). */
    const char *sep = NULL;
    for (const char *q = s; q + 3 <= e; q++) {
        if (memcmp(q, "://", 3) == 0) {
            sep = q;
            break;
        }
    }
    if (sep) {
        size_t slen = (size_t)(sep - s);
        int valid = slen > 0 && slen <= PROXY_SCHEME_MAX && is_alpha(*s);
        for (const char *q = s; valid && q < sep; q++)
            valid = is_alpha(*q) || is_digit(*q) || *q == '+' || *q == '-' || *q == '.';
        if (!valid)
            return fail(p, why, "has an invalid scheme");
        if (slen == 5 && strncasecmp(s, "https", 5) == 0)
            return fail(p, why, "is an https:// proxy, which is not supported: use http://");
        if (slen != 4 || strncasecmp(s, "http", 4) != 0)
            return fail(p, why, "has an unsupported scheme: only http:// proxies are supported");
        s = sep + 3;
    }

    /* Authority up to the first '/', '?' or '#'; after it only a lone "/" is allowed. */
    const char *aend = s;
    while (aend < e && *aend != '/' && *aend != '?' && *aend != '#')
        aend++;
    if (!(aend == e || (aend + 1 == e && *aend == '/')))
        return fail(p, why,
                    "has a path, query or fragment; expected http://[user:password@]host[:port]");

    /* Credentials before the last '@'. */
    const char *hs = s;
    for (const char *q = aend; q > s; q--) {
        if (q[-1] == '@') {
            hs = q;
            break;
        }
    }
    if (hs > s) {
        const char *uend = hs - 1;
        const char *colon = memchr(s, ':', (size_t)(uend - s));
        const char *ue = colon ? colon : uend;
        ulen = pct_decode(s, (size_t)(ue - s), user, PROXY_CRED_MAX);
        plen = colon ? pct_decode(colon + 1, (size_t)(uend - colon - 1), pass, PROXY_CRED_MAX) : 0;
        if (!colon)
            pass[0] = 0;
        if (ulen < 0 || plen < 0) {
            reason = "has a bad %-escape or an over-long user name or password";
            goto out_fail;
        }
        if (ulen == 0 && plen == 0 && !colon)
            ulen = -1; /* "@host": no credentials */
    }

    /* Host and port. */
    char host[PROXY_HOST_MAX + 1];
    size_t hlen;
    const char *port = NULL, *pend = aend;
    if (hs < aend && *hs == '[') {
        const char *close = memchr(hs, ']', (size_t)(aend - hs));
        unsigned char addr[PROXY_ADDR_MAX];
        if (!close) {
            reason = "has an unterminated IPv6 address";
            goto out_fail;
        }
        hlen = (size_t)(close - hs - 1);
        if (hlen == 0 || hlen > PROXY_HOST_MAX) {
            reason = "has an invalid IPv6 address";
            goto out_fail;
        }
        memcpy(host, hs + 1, hlen);
        host[hlen] = 0;
        if (inet_pton(AF_INET6, host, addr) != 1) {
            reason = "has an invalid IPv6 address";
            goto out_fail;
        }
        if (close + 1 < aend) {
            if (close[1] != ':') {
                reason = "has junk after the IPv6 address";
                goto out_fail;
            }
            port = close + 2;
        }
    } else {
        const char *colon = memchr(hs, ':', (size_t)(aend - hs));
        const char *he = colon ? colon : aend;
        hlen = (size_t)(he - hs);
        if (colon && memchr(colon + 1, ':', (size_t)(aend - colon - 1))) {
            reason = "has an IPv6 address without brackets";
            goto out_fail;
        }
        if (hlen == 0) {
            reason = "has no host";
            goto out_fail;
        }
        if (hlen > PROXY_HOST_MAX) {
            reason = "has a host name that is too long";
            goto out_fail;
        }
        for (size_t i = 0; i < hlen; i++) {
            if (!host_char_ok(hs[i])) {
                reason = "has an invalid host name";
                goto out_fail;
            }
        }
        memcpy(host, hs, hlen);
        host[hlen] = 0;
        port = colon ? colon + 1 : NULL;
    }
    if (port && port < pend) {
        long v = port_value(port, (size_t)(pend - port));
        if (v < 0) {
            reason = "has an invalid port";
            goto out_fail;
        }
        snprintf(p->port, sizeof p->port, "%u", (unsigned)(uint16_t)v); /* v <= 65535 */
    } else {
        snprintf(p->port, sizeof p->port, "%s", PROXY_DEFAULT_PORT); /* "host" or "host:" */
    }
    p->host = xstrdup(host);

    if (ulen >= 0) {
        p->authorization = basic_credentials(user, (size_t)ulen, pass, (size_t)plen);
        if (!p->authorization) {
            reason = "has credentials that cannot be encoded";
            goto out_fail;
        }
    }

    /* The description: "http://" [user ":***@"] host ":" port. */
    size_t dmax = sizeof "http://" + 3 * (ulen > 0 ? (size_t)ulen : 0) + sizeof ":" PROXY_MASK "@" +
                  hlen + 2 + 1 + sizeof p->port;
    char *d = xmalloc(dmax);
    size_t o = 0;
    int bracket = strchr(host, ':') != NULL;
    memcpy(d, "http://", 7);
    o = 7;
    if (ulen >= 0) {
        pct_encode(d, &o, user, (size_t)ulen);
        memcpy(d + o, ":" PROXY_MASK "@", 5);
        o += 5;
    }
    o += (size_t)snprintf(d + o, dmax - o, "%s%s%s:%s", bracket ? "[" : "", host,
                          bracket ? "]" : "", p->port);
    p->description = d;
    secret_zero(user, sizeof user);
    secret_zero(pass, sizeof pass);
    return 0;

out_fail:
    secret_zero(user, sizeof user);
    secret_zero(pass, sizeof pass);
    return fail(p, why, reason);
}

void proxy_free(struct proxy *p)
{
    if (!p)
        return;
    free(p->host);
    secret_free_str(p->authorization);
    free(p->description);
    memset(p, 0, sizeof *p);
}

const char *proxy_describe(const struct proxy *p)
{
    return p && p->description ? p->description : "";
}

const char *proxy_redact(const char *url, char *out, size_t outlen)
{
    if (!out || !outlen)
        return out;
    if (!url) {
        out[0] = 0;
        return out;
    }
    /* a scheme only counts as a scheme name ("http", "svc+x") at the start (blanks aside):
     * "user:pw@host/?u=http://x", "user:p://w@host" and "=p://w@host" have none, and their
     * passwords must still be masked */
    const char *start = url, *q = url;
    while (is_space(*q))
        q++;
    if (is_alpha(*q)) {
        while (is_alpha(*q) || is_digit(*q) || *q == '+' || *q == '-' || *q == '.')
            q++;
        if (strncmp(q, "://", 3) == 0)
            start = q + 3;
    }
    const char *at = strrchr(start, '@');
    const char *colon = at ? memchr(start, ':', (size_t)(at - start)) : NULL;
    if (!colon)
        snprintf(out, outlen, "%s", url);
    else
        snprintf(out, outlen, "%.*s" PROXY_MASK "%s", (int)(colon + 1 - url), url, at);
    for (char *p = out; *p; p++) /* keep error messages on one line */
        if ((unsigned char)*p < 0x20 || (unsigned char)*p == 0x7f)
            *p = '?';
    return out;
}

/* ---- NO_PROXY ----------------------------------------------------------------------------- */

struct proxy_ip {
    int family; /* AF_INET, AF_INET6, or 0 when not an IP literal */
    unsigned char addr[PROXY_ADDR_MAX];
};

static int ip_parse(const char *s, struct proxy_ip *ip)
{
    if (inet_pton(AF_INET, s, ip->addr) == 1) {
        ip->family = AF_INET;
        return 0;
    }
    if (inet_pton(AF_INET6, s, ip->addr) == 1) {
        ip->family = AF_INET6;
        return 0;
    }
    ip->family = 0;
    return -1;
}

static size_t ip_len(const struct proxy_ip *ip)
{
    return ip->family == AF_INET ? 4 : PROXY_ADDR_MAX;
}

/* Whether host is inside the CIDR range "addr/bits" in e (lower case, brackets allowed). */
static int cidr_match(char *e, const struct proxy_ip *host)
{
    char *slash = strchr(e, '/');
    struct proxy_ip net;
    *slash = 0;
    char *a = e;
    size_t alen = strlen(a);
    if (alen >= 2 && a[0] == '[' && a[alen - 1] == ']') {
        a[alen - 1] = 0;
        a++;
    }
    long bits = -1;
    const char *b = slash + 1;
    size_t blen = strlen(b);
    if (blen >= 1 && blen <= 3) {
        bits = 0;
        for (size_t i = 0; i < blen && bits >= 0; i++)
            bits = is_digit(b[i]) ? bits * 10 + (b[i] - '0') : -1;
    }
    if (bits < 0 || ip_parse(a, &net) < 0 || (size_t)bits > 8 * ip_len(&net))
        return 0;
    if (host->family != net.family)
        return 0;
    size_t full = (size_t)bits / 8;
    unsigned rest = (unsigned)bits % 8;
    if (memcmp(host->addr, net.addr, full) != 0)
        return 0;
    if (rest) {
        unsigned char mask = (unsigned char)(0xff << (8 - rest));
        if ((host->addr[full] & mask) != (net.addr[full] & mask))
            return 0;
    }
    return 1;
}

/* Matches one trimmed, lower-cased entry (not "*", not a range) against the normalised host. */
static int entry_match(char *e, const char *host, const struct proxy_ip *hip, long port)
{
    char *name = e, *eport = NULL;
    struct proxy_ip ip;
    if (e[0] == '[') {
        char *close = strchr(e, ']');
        if (!close || (close[1] && close[1] != ':'))
            return 0;
        *close = 0;
        name = e + 1;
        if (close[1])
            eport = close + 2;
    } else if (ip_parse(e, &ip) < 0) {
        char *colon = strrchr(e, ':');
        if (colon && strchr(e, ':') != colon)
            return 0; /* several colons but not an IPv6 address */
        if (colon) {
            *colon = 0;
            eport = colon + 1;
        }
    }
    if (eport) {
        long v = port_value(eport, strlen(eport));
        if (v < 0 || v != port)
            return 0;
    }
    if (ip_parse(name, &ip) == 0)
        return hip->family == ip.family && memcmp(hip->addr, ip.addr, ip_len(&ip)) == 0;
    if (hip->family)
        return 0; /* names never match IP-literal hosts */
    if (name[0] == '*' && name[1] == '.')
        name++;
    if (name[0] == '.')
        name++;
    size_t nlen = strlen(name);
    if (nlen > 0 && name[nlen - 1] == '.')
        name[--nlen] = 0;
    if (nlen == 0)
        return 0;
    size_t hlen = strlen(host);
    if (hlen == nlen)
        return memcmp(host, name, nlen) == 0;
    return hlen > nlen && host[hlen - nlen - 1] == '.' &&
           memcmp(host + hlen - nlen, name, nlen) == 0;
}

int proxy_bypass(const char *no_proxy, const char *host, const char *port)
{
    char h[PROXY_HOST_MAX + 1];
    char e[PROXY_ENTRY_MAX + 1];
    struct proxy_ip hip;

    if (!no_proxy || !host)
        return 0;
    size_t hlen = strlen(host);
    if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']') {
        host++;
        hlen -= 2;
    }
    if (hlen > 0 && host[hlen - 1] == '.')
        hlen--;
    int host_ok = hlen > 0 && hlen <= PROXY_HOST_MAX;
    if (host_ok) {
        for (size_t i = 0; i < hlen; i++)
            h[i] = lower(host[i]);
        h[hlen] = 0;
        (void)ip_parse(h, &hip);
    }
    long pnum = port ? port_value(port, strlen(port)) : -1;

    for (const char *s = no_proxy; *s;) {
        const char *comma = strchr(s, ',');
        const char *end = comma ? comma : s + strlen(s);
        const char *a = s, *b = end;
        s = comma ? comma + 1 : end;
        while (a < b && is_space(*a))
            a++;
        while (b > a && is_space(b[-1]))
            b--;
        size_t n = (size_t)(b - a);
        if (n == 0)
            continue;
        if (n == 1 && *a == '*')
            return 1;
        if (!host_ok || n > PROXY_ENTRY_MAX)
            continue;
        for (size_t i = 0; i < n; i++)
            e[i] = lower(a[i]);
        e[n] = 0;
        if (strchr(e, '/') ? cidr_match(e, &hip) : entry_match(e, h, &hip, pnum))
            return 1;
    }
    return 0;
}
