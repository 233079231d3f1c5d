/* libFuzzer: the HTTP CONNECT proxy settings and the proxy's answer (proxy.h, proxy_answer.h).
 *
 *  - proxy_parse either refuses with a non-empty, log-safe reason and leaves the struct empty, or
 *    gives what an independent reading of the URL gives: host (1..PROXY_HOST_MAX bytes, a name or
 *    an IPv6 literal), port (1..65535, digits, no leading zero), the Basic credentials exactly, and
 *    a description that is exactly http://[user:***@]host:port, never holding the password;
 *  - proxy_redact never shows a password, whichever way one reads where the URL's password is,
 *    writes one line of printable bytes, and truncates to a prefix;
 *  - proxy_bypass: "*" bypasses, an entry list bypasses iff one of its entries does, case does not
 *    matter, nor a trailing dot or brackets on the host, an entry with a port never matches
 *    without one, a matched name's subdomains match, and a host always matches itself;
 *  - proxy_answer gives the same outcome however the answer is cut into reads (status, reason,
 *    why, and where the tunnel's bytes begin), takes at most its cap, opens only on a 2xx whose
 *    head ends at an empty line, refuses with "proxy answered CONNECT with STATUS ...", and its why
 *    is one line.
 *
 * Input: byte 0 is flags (how the answer is cut, its cap, the size for the truncated redaction,
 * whether a port is given), then NUL-separated: the proxy URL, two NO_PROXY lists, a host, a port,
 * and the rest is the proxy's answer to CONNECT. */
#include <arpa/inet.h>
#include <mbedtls/base64.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proxy.h"
#include "proxy_answer.h"

#include "fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FIELD_MAX 4096

NOCOV static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
}

NOCOV static int is_alpha(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

NOCOV static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

NOCOV static int hexv(char c)
{
    return is_digit(c)            ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

NOCOV static int contains(const char *hay, size_t hn, const char *needle, size_t nn)
{
    return nn > 0 && memmem(hay, hn, needle, nn) != NULL;
}

/* ---- proxy_parse against an independent reading of an accepted URL -------------------------- */

NOCOV static size_t pct_decode(const char *s, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%' && i + 2 < n && hexv(s[i + 1]) >= 0 && hexv(s[i + 2]) >= 0) {
            out[o++] = (char)(hexv(s[i + 1]) * 16 + hexv(s[i + 2]));
            i += 2;
        } else {
            out[o++] = s[i];
        }
    }
    return o;
}

NOCOV static size_t pct_encode(const char *s, size_t n, char *out)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (is_alpha((char)c) || is_digit((char)c) || c == '-' || c == '.' || c == '_' ||
            c == '~') {
            out[o++] = (char)c;
        } else {
            out[o++] = '%';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    return o;
}

NOCOV static void check_parsed(const char *url, const struct proxy *p)
{
    static char user[FIELD_MAX], pass[FIELD_MAX], want[4 * FIELD_MAX], creds[2 * FIELD_MAX];
    static unsigned char dec[2 * FIELD_MAX];
    const char *s = url, *e = url + strlen(url);
    while (s < e && is_space(*s))
        s++;
    while (e > s && is_space(e[-1]))
        e--;
    const char *sep = memmem(s, (size_t)(e - s), "://", 3);
    if (sep) {
        CHECK(sep - s == 4 && strncasecmp(s, "http", 4) == 0);
        s = sep + 3;
    }
    const char *aend = s;
    while (aend < e && !strchr("/?#", *aend))
        aend++;
    CHECK(aend == e || (aend + 1 == e && *aend == '/'));
    const char *at = NULL;
    for (const char *q = s; q < aend; q++)
        if (*q == '@')
            at = q;
    const char *hs = at ? at + 1 : s;
    size_t ulen = 0, plen = 0;
    int cred = at && at > s;
    if (cred) {
        const char *colon = memchr(s, ':', (size_t)(at - s));
        ulen = pct_decode(s, (size_t)((colon ? colon : at) - s), user);
        plen = colon ? pct_decode(colon + 1, (size_t)(at - colon - 1), pass) : 0;
    }
    /* host and port */
    const char *hb, *he, *port;
    if (*hs == '[') {
        hb = hs + 1;
        he = memchr(hs, ']', (size_t)(aend - hs));
        CHECK(he);
        port = he + 1 < aend ? he + 2 : NULL;
    } else {
        hb = hs;
        he = memchr(hs, ':', (size_t)(aend - hs));
        port = he ? he + 1 : NULL;
        if (!he)
            he = aend;
    }
    size_t hlen = (size_t)(he - hb);
    CHECK(p->host && strlen(p->host) == hlen && memcmp(p->host, hb, hlen) == 0);
    CHECK(hlen >= 1 && hlen <= PROXY_HOST_MAX);
    unsigned char a6[16];
    int v6 = strchr(p->host, ':') != NULL;
    if (v6) {
        CHECK(inet_pton(AF_INET6, p->host, a6) == 1);
    } else {
        for (size_t i = 0; i < hlen; i++)
            CHECK(is_alpha(p->host[i]) || is_digit(p->host[i]) || strchr("-._", p->host[i]));
    }
    unsigned long pv = 80;
    if (port && port < aend) {
        pv = 0;
        for (const char *q = port; q < aend; q++)
            pv = pv * 10 + (unsigned long)(*q - '0');
    }
    char pbuf[16];
    snprintf(pbuf, sizeof pbuf, "%lu", pv);
    CHECK(strcmp(p->port, pbuf) == 0);
    size_t pl = strlen(p->port);
    CHECK(pl >= 1 && pl <= 5 && p->port[0] != '0' && pv >= 1 && pv <= 65535);

    /* the credentials: exactly "user:password" */
    if (!cred) {
        CHECK(p->authorization == NULL);
    } else {
        CHECK(p->authorization && strncmp(p->authorization, "Basic ", 6) == 0);
        size_t cn = 0, dn = 0;
        memcpy(creds, user, ulen);
        creds[ulen] = ':';
        memcpy(creds + ulen + 1, pass, plen);
        cn = ulen + 1 + plen;
        const char *b64 = p->authorization + 6;
        CHECK(mbedtls_base64_decode(dec, sizeof dec, &dn, (const unsigned char *)b64,
                                    strlen(b64)) == 0);
        CHECK(dn == cn && memcmp(dec, creds, cn) == 0);
    }

    /* the description, and no password in it */
    size_t o = 0;
    memcpy(want, "http://", 7);
    o = 7;
    if (cred) {
        o += pct_encode(user, ulen, want + o);
        memcpy(want + o, ":***@", 5);
        o += 5;
    }
    o += (size_t)snprintf(want + o, sizeof want - o, "%s%s%s:%s", v6 ? "[" : "", p->host,
                          v6 ? "]" : "", p->port);
    const char *d = proxy_describe(p);
    CHECK(strlen(d) == o && memcmp(d, want, o) == 0);
    if (cred && plen && !contains(want, o, pass, plen))
        CHECK(!contains(d, strlen(d), pass, plen));
}

/* ---- proxy_redact: no reading of the URL finds its password in the output ------------------- */

NOCOV static void sanitize(char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] == 0x7f)
            s[i] = '?';
}

/* If [a, b) of url were the password, the ideal redaction would not show it: then out must not. */
NOCOV static void check_masked(const char *url, size_t n, size_t a, size_t b, const char *out)
{
    static char ideal[FIELD_MAX + 8];
    if (b <= a || memchr(url + a, '*', b - a))
        return; /* empty, or it could be spelled by the mask itself */
    memcpy(ideal, url, a);
    memcpy(ideal + a, "***", 3);
    memcpy(ideal + a + 3, url + b, n - b);
    size_t in = a + 3 + n - b;
    sanitize(ideal, in);
    if (contains(ideal, in, url + a, b - a))
        return; /* the rest of the URL holds the same bytes */
    if (contains(out, strlen(out), url + a, b - a)) {
        fprintf(stderr, "fuzz_proxy: redact shows the password '%.*s': '%s'\n", (int)(b - a),
                url + a, out);
        __builtin_trap();
    }
}

/* The password after the userinfo's first ':' up to an '@' (the last in the authority, or the
 * last of all), the authority starting at r. */
NOCOV static void check_from(const char *url, size_t n, size_t r, const char *out)
{
    size_t aend = r;
    while (aend < n && !strchr("/?#", url[aend]))
        aend++;
    for (int last_of_all = 0; last_of_all < 2; last_of_all++) {
        size_t end = last_of_all ? n : aend, at = SIZE_MAX;
        for (size_t i = r; i < end; i++)
            if (url[i] == '@')
                at = i;
        if (at == SIZE_MAX)
            continue;
        const char *colon = memchr(url + r, ':', at - r);
        if (colon)
            check_masked(url, n, (size_t)(colon + 1 - url), at, out);
    }
}

NOCOV static void check_redact(const char *url, unsigned flags)
{
    static char out[FIELD_MAX + 64], small[FIELD_MAX + 64];
    size_t n = strlen(url);
    CHECK(proxy_redact(url, out, sizeof out) == out);
    size_t on = strlen(out);
    CHECK(on < sizeof out);
    for (size_t i = 0; i < on; i++)
        CHECK((unsigned char)out[i] >= 0x20 && (unsigned char)out[i] != 0x7f);
    /* a smaller buffer: a prefix of the same */
    size_t sn = 1 + (flags >> 3) * 3;
    memset(small, 'Z', sizeof small);
    CHECK(proxy_redact(url, small, sn) == small);
    CHECK(memchr(small, 0, sn) != NULL && strncmp(small, out, strlen(small)) == 0);
    CHECK(strlen(small) == (on < sn - 1 ? on : sn - 1));
    CHECK(small[sn] == 'Z');

    /* the readings, blanks aside: after a valid scheme ("http://", "svc+x://") or, without one,
     * from the start; or after the first "://" of all (proxy_parse's) */
    size_t t = 0, q;
    while (t < n && is_space(url[t]))
        t++;
    q = t;
    if (q < n && is_alpha(url[q]))
        while (q < n && (is_alpha(url[q]) || is_digit(url[q]) || strchr("+-.", url[q])))
            q++;
    check_from(url, n, q > t && strncmp(url + q, "://", 3) == 0 ? q + 3 : t, out);
    const char *sep = strstr(url, "://");
    if (sep)
        check_from(url, n, (size_t)(sep + 3 - url), out);
}

/* ---- proxy_bypass: properties of the matching ---------------------------------------------- */

NOCOV static void toggle_case(char *s)
{
    for (; *s; s++)
        if (is_alpha(*s))
            *s ^= 0x20;
}

NOCOV static int is_ip(const char *h)
{
    unsigned char a[16];
    return inet_pton(AF_INET, h, a) == 1 || inet_pton(AF_INET6, h, a) == 1;
}

NOCOV static int clean_name(const char *h)
{
    size_t n = strlen(h);
    if (n == 0 || n > PROXY_HOST_MAX || h[0] == '.' || h[n - 1] == '.' || strstr(h, "..") ||
        is_ip(h))
        return 0;
    for (const char *q = h; *q; q++)
        if (!is_alpha(*q) && !is_digit(*q) && !strchr("-_.", *q))
            return 0;
    return 1;
}

NOCOV static int valid_port(const char *p)
{
    size_t n = strlen(p);
    if (n == 0 || n > 5)
        return 0;
    long v = 0;
    for (const char *q = p; *q; q++) {
        if (!is_digit(*q))
            return 0;
        v = v * 10 + (*q - '0');
    }
    return v >= 1 && v <= 65535;
}

NOCOV static void check_bypass(const char *a, const char *b, const char *host, const char *port)
{
    static char ab[2 * FIELD_MAX + 2], h2[FIELD_MAX + 4], t1[2 * FIELD_MAX + 2], t2[FIELD_MAX + 4];
    int ra = proxy_bypass(a, host, port), rb = proxy_bypass(b, host, port);
    CHECK((ra == 0 || ra == 1) && (rb == 0 || rb == 1));
    /* a list bypasses iff one of its entries does */
    snprintf(ab, sizeof ab, "%s,%s", a, b);
    int rab = proxy_bypass(ab, host, port);
    CHECK(rab == (ra || rb));
    CHECK(proxy_bypass(ab, host, NULL) <= rab); /* entries with a port need one */
    snprintf(t1, sizeof t1, "%s , *", a);
    CHECK(proxy_bypass(t1, host, port) == 1);
    CHECK(proxy_bypass(NULL, host, port) == 0 && proxy_bypass("", host, port) == 0);
    /* case does not matter */
    snprintf(t1, sizeof t1, "%s", ab);
    snprintf(t2, sizeof t2, "%s", host);
    toggle_case(t1);
    toggle_case(t2);
    CHECK(proxy_bypass(t1, t2, port) == rab);
    size_t hn = strlen(host);
    int bracketed = hn >= 2 && host[0] == '[' && host[hn - 1] == ']';
    if (hn > 0 && host[hn - 1] != '.' && !bracketed) { /* one trailing dot does not matter */
        snprintf(h2, sizeof h2, "%s.", host);
        CHECK(proxy_bypass(ab, h2, port) == rab);
    }
    if (!bracketed) { /* nor brackets */
        snprintf(h2, sizeof h2, "[%s]", host);
        CHECK(proxy_bypass(ab, h2, port) == rab);
    }
    /* a name that matches has subdomains that match */
    if (rab && clean_name(host) && hn + 2 <= PROXY_HOST_MAX) {
        snprintf(h2, sizeof h2, "x.%s", host);
        CHECK(proxy_bypass(ab, h2, port) == 1);
    }
    /* a host matches itself, with its port or without */
    int self = clean_name(host);
    unsigned char a6[16];
    int v6 = inet_pton(AF_INET6, host, a6) == 1;
    if (self || is_ip(host)) {
        CHECK(proxy_bypass(host, host, port) == 1);
        if (port && valid_port(port)) {
            snprintf(t1, sizeof t1, v6 ? "[%s]:%s" : "%s:%s", host, port);
            CHECK(proxy_bypass(t1, host, port) == 1);
            snprintf(t1, sizeof t1, v6 ? "foo.invalid,[%s]:%s" : "foo.invalid, %s:%s", host, port);
            CHECK(proxy_bypass(t1, host, port) == 1);
        }
    }
}

/* ---- proxy_answer: the same outcome however it is cut ------------------------------------- */

struct outcome {
    int rc;
    int status;
    size_t consumed; /* OPEN: bytes of the input the answer took */
    char reason[PROXY_ANSWER_REASON_MAX + 1];
    size_t reason_len;
    char why[256];
};

NOCOV static void run_answer(const char *in, size_t n, size_t max, size_t chunk, struct outcome *o)
{
    struct proxy_answer a;
    size_t off = 0, used = 0;
    memset(o, 0, sizeof *o);
    proxy_answer_init(&a, max);
    o->rc = PROXY_ANSWER_MORE;
    do {
        size_t k = chunk && n - off > chunk ? chunk : n - off;
        used = 99999;
        o->rc = proxy_answer_feed(&a, in + off, k, &used, o->why, sizeof o->why);
        CHECK(a.bytes <= max);
        CHECK(a.reason_len <= PROXY_ANSWER_REASON_MAX && a.reason[a.reason_len] == 0);
        if (o->rc == PROXY_ANSWER_OPEN) {
            CHECK(used <= k);
            o->consumed = off + used;
        }
        off += k;
    } while (o->rc == PROXY_ANSWER_MORE && off < n);
    o->status = a.status;
    memcpy(o->reason, a.reason, sizeof o->reason);
    o->reason_len = a.reason_len;
    if (o->rc != PROXY_ANSWER_MORE) {
        CHECK(o->why[0] || o->rc == PROXY_ANSWER_OPEN);
        CHECK(!strchr(o->why, '\n') && !strchr(o->why, '\r'));
    }
    switch (o->rc) {
    case PROXY_ANSWER_MORE:
        CHECK(n <= max); /* more than the cap is never waited for */
        break;
    case PROXY_ANSWER_OPEN:
        CHECK(o->status >= 200 && o->status <= 299);
        CHECK(o->consumed >= 1 && o->consumed <= max && o->consumed <= n);
        /* the empty line ends it (llhttp, lenient, takes "\r" and any byte for "\r\n" there) */
        CHECK(in[o->consumed - 1] == '\n' || (o->consumed >= 2 && in[o->consumed - 2] == '\r'));
        break;
    case PROXY_ANSWER_REFUSED: {
        char want[64];
        int wn = snprintf(want, sizeof want, "proxy answered CONNECT with %d ", o->status);
        CHECK(o->status < 200 || o->status > 299);
        CHECK(o->status >= 100 && o->status <= 999);
        CHECK(strncmp(o->why, want, (size_t)wn) == 0);
        break;
    }
    case PROXY_ANSWER_BAD:
        CHECK(strncmp(o->why, "invalid answer to CONNECT: ", 27) == 0 ||
              strncmp(o->why, "answer to CONNECT over ", 23) == 0);
        break;
    default:
        CHECK(0);
    }
}

NOCOV static void check_answer(const char *in, size_t n, unsigned flags)
{
    static const size_t chunks[] = {1, 2, 3, 7, 16, 100, 1000};
    size_t max = (flags & 0x40) ? 24 + (flags & 0x3f) * 4 : 8192;
    struct outcome whole, cut;
    run_answer(in, n, max, 0, &whole);
    run_answer(in, n, max, chunks[flags % 7], &cut);
    CHECK(whole.rc == cut.rc);
    if (whole.rc == PROXY_ANSWER_OPEN || whole.rc == PROXY_ANSWER_REFUSED) {
        CHECK(whole.status == cut.status);
        CHECK(whole.reason_len == cut.reason_len &&
              memcmp(whole.reason, cut.reason, whole.reason_len) == 0);
        CHECK(strcmp(whole.why, cut.why) == 0);
    }
    if (whole.rc == PROXY_ANSWER_OPEN)
        CHECK(whole.consumed == cut.consumed);
}

/* ---- the input ------------------------------------------------------------------------------ */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char field[5][FIELD_MAX + 1];
    if (size < 1)
        return 0;
    unsigned flags = data[0];
    const char *s = (const char *)data + 1, *end = (const char *)data + size;
    for (int i = 0; i < 5; i++) {
        const char *z = memchr(s, 0, (size_t)(end - s));
        size_t n = (size_t)((z ? z : end) - s);
        if (n > FIELD_MAX)
            n = FIELD_MAX;
        memcpy(field[i], s, n);
        field[i][n] = 0;
        s = z ? z + 1 : end;
    }
    const char *url = field[0];

    struct proxy p;
    const char *why = NULL;
    memset(&p, 0x5a, sizeof p);
    int rc = proxy_parse(&p, url, &why);
    CHECK(rc == 0 || rc == -1);
    if (rc == 0) {
        check_parsed(url, &p);
    } else {
        CHECK(why && why[0]);
        for (const char *q = why; *q; q++)
            CHECK(*q >= 0x20 && *q < 0x7f);
        CHECK(!p.host && !p.authorization && !p.description && p.port[0] == 0);
        CHECK(strcmp(proxy_describe(&p), "") == 0);
    }
    proxy_free(&p);
    proxy_free(&p);
    CHECK(!p.host && !p.authorization && !p.description);

    check_redact(url, flags);
    check_bypass(field[1], field[2], field[3], (flags & 0x80) ? NULL : field[4]);
    check_answer(s, (size_t)(end - s), flags);
    return 0;
}
