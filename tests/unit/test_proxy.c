/* test_proxy.c - proxy_parse / proxy_describe / proxy_redact / proxy_bypass, table-driven.
 * Each table row becomes one cmocka test named "<table>: <row>". */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <mbedtls/base64.h>

#include "proxy.h"
#include "proxy_answer.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define MAX_TESTS    256
#define NAME_MAX_LEN 200
#define DECODED_MAX  1024
#define REDACT_MAX   256

/* ---- registration of one cmocka test per table row ---------------------------------------- */

static struct CMUnitTest tests[MAX_TESTS];
static char names[MAX_TESTS][NAME_MAX_LEN];
static size_t ntests;

static void add(const char *table, const char *row, CMUnitTestFunction fn, const void *state)
{
    if (ntests >= MAX_TESTS)
        abort();
    snprintf(names[ntests], sizeof names[ntests], "%s: %s", table, row);
    tests[ntests] = (struct CMUnitTest){names[ntests], fn, NULL, NULL, (void *)state};
    ntests++;
}

#define ADD_ROWS(table, rows, fn)                                                                  \
    for (size_t i_ = 0; i_ < ARRAY_LEN(rows); i_++)                                                \
    add(table, (rows)[i_].name, fn, &(rows)[i_])

/* ---- proxy_parse: good URLs --------------------------------------------------------------- */

struct good_row {
    const char *name;
    const char *url;
    const char *host;
    const char *port;
    const char *creds; /* decoded "user:password" in the Basic header, or NULL for none */
    const char *desc;  /* proxy_describe() */
};

static const struct good_row good_rows[] = {
    {"name and port", "http://proxy.corp:3128", "proxy.corp", "3128", NULL,
     "http://proxy.corp:3128"},
    {"trailing slash", "http://proxy.corp:3128/", "proxy.corp", "3128", NULL,
     "http://proxy.corp:3128"},
    {"scheme is case-insensitive", "HTTP://Proxy.Corp:3128", "Proxy.Corp", "3128", NULL,
     "http://Proxy.Corp:3128"},
    {"missing port is 80", "http://proxy.corp", "proxy.corp", "80", NULL, "http://proxy.corp:80"},
    {"missing port with slash", "http://proxy.corp/", "proxy.corp", "80", NULL,
     "http://proxy.corp:80"},
    {"empty port is 80", "http://proxy.corp:", "proxy.corp", "80", NULL, "http://proxy.corp:80"},
    {"leading zeros in port", "http://proxy.corp:08080", "proxy.corp", "8080", NULL,
     "http://proxy.corp:8080"},
    {"bare host:port is http", "proxy.corp:3128", "proxy.corp", "3128", NULL,
     "http://proxy.corp:3128"},
    {"bare host is http on 80", "proxy.corp", "proxy.corp", "80", NULL, "http://proxy.corp:80"},
    {"surrounding spaces", "  http://proxy.corp:3128 \t\n", "proxy.corp", "3128", NULL,
     "http://proxy.corp:3128"},
    {"IPv4 literal", "http://10.0.0.1:3128", "10.0.0.1", "3128", NULL, "http://10.0.0.1:3128"},
    {"IPv6 literal", "http://[::1]:3128", "::1", "3128", NULL, "http://[::1]:3128"},
    {"IPv6 without port", "http://[2001:db8::1]", "2001:db8::1", "80", NULL,
     "http://[2001:db8::1]:80"},
    {"bare IPv6 with port", "[fd00::5]:8080", "fd00::5", "8080", NULL, "http://[fd00::5]:8080"},
    {"underscore in name", "http://proxy_1.corp.local:1", "proxy_1.corp.local", "1", NULL,
     "http://proxy_1.corp.local:1"},
    {"port 65535", "http://p:65535", "p", "65535", NULL, "http://p:65535"},
    {"user and password", "http://user:pass@proxy:8080", "proxy", "8080", "user:pass",
     "http://user:***@proxy:8080"},
    {"%40 and %3A in credentials", "http://us%40er:p%40ss%3Aw0rd@proxy:8080", "proxy", "8080",
     "us@er:p@ss:w0rd", "http://us%40er:***@proxy:8080"},
    {"lower-case escapes", "http://a%2fb:c%2fd@proxy", "proxy", "80", "a/b:c/d",
     "http://a%2Fb:***@proxy:80"},
    {"raw '@' in the password: last '@' ends the credentials", "http://user:p@ss@proxy:1", "proxy",
     "1", "user:p@ss", "http://user:***@proxy:1"},
    {"':' in the password", "http://user:pa:ss@proxy", "proxy", "80", "user:pa:ss",
     "http://user:***@proxy:80"},
    {"user without password", "http://user@proxy:3128", "proxy", "3128",
     "user:", "http://user:***@proxy:3128"},
    {"empty password", "http://user:@proxy:3128", "proxy", "3128",
     "user:", "http://user:***@proxy:3128"},
    {"password without user", "http://:secret@proxy", "proxy", "80", ":secret",
     "http://:***@proxy:80"},
    {"empty userinfo is no credentials", "http://@proxy:3128", "proxy", "3128", NULL,
     "http://proxy:3128"},
    {"credentials on a bare host:port", "user:pass@proxy:3128", "proxy", "3128", "user:pass",
     "http://user:***@proxy:3128"},
    {"credentials and IPv6", "http://u:p@[::1]:3128", "::1", "3128", "u:p",
     "http://u:***@[::1]:3128"},
    {"space in user name is encoded in the description", "http://a%20b:x@proxy", "proxy", "80",
     "a b:x", "http://a%20b:***@proxy:80"},
};

static void t_good(void **state)
{
    const struct good_row *r = *state;
    struct proxy p;
    const char *why = "untouched";
    int rc = proxy_parse(&p, r->url, &why);
    if (rc != 0)
        fail_msg("proxy_parse(%s) failed: %s", r->url, why);
    assert_string_equal(p.host, r->host);
    assert_string_equal(p.port, r->port);
    assert_string_equal(proxy_describe(&p), r->desc);
    if (!r->creds) {
        assert_null(p.authorization);
    } else {
        unsigned char dec[DECODED_MAX];
        size_t n = 0;
        assert_non_null(p.authorization);
        assert_true(strncmp(p.authorization, "Basic ", 6) == 0);
        const char *b64 = p.authorization + 6;
        assert_int_equal(
            mbedtls_base64_decode(dec, sizeof dec - 1, &n, (const unsigned char *)b64, strlen(b64)),
            0);
        dec[n] = 0;
        assert_int_equal(n, strlen(r->creds));
        assert_string_equal((char *)dec, r->creds);
        /* The description never shows the password. */
        const char *pw = strchr(r->creds, ':') + 1;
        if (strlen(pw) >= 2)
            assert_null(strstr(proxy_describe(&p), pw));
    }
    proxy_free(&p);
    assert_null(p.host);
    assert_null(p.authorization);
    assert_null(p.description);
    assert_string_equal(proxy_describe(&p), "");
    proxy_free(&p); /* twice is harmless */
}

/* ---- proxy_parse: bad URLs ---------------------------------------------------------------- */

struct bad_row {
    const char *name;
    const char *url;
    const char *why; /* a substring of the reason */
};

static const struct bad_row bad_rows[] = {
    {"NULL", NULL, "empty"},
    {"empty", "", "empty"},
    {"only spaces", "   ", "empty"},
    {"https scheme refused", "https://proxy.corp:443", "https"},
    {"HTTPS scheme refused", "HTTPS://proxy.corp", "https"},
    {"socks5 refused", "socks5://proxy.corp:1080", "unsupported scheme"},
    {"invalid scheme", "1http://proxy", "invalid scheme"},
    {"scheme only", "http://", "no host"},
    {"port only", "http://:3128", "no host"},
    {"credentials without host", "http://user:secret@", "no host"},
    {"port 0", "http://proxy:0", "port"},
    {"port 65536", "http://proxy:65536", "port"},
    {"port with letters", "http://proxy:31a8", "port"},
    {"port too long", "http://proxy:000003128", "port"},
    {"negative port", "http://proxy:-1", "port"},
    {"path", "http://proxy:3128/path", "path"},
    {"two slashes", "http://proxy:3128//", "path"},
    {"query", "http://proxy:3128?x=1", "path"},
    {"fragment", "http://proxy:3128#x", "path"},
    {"space inside", "http://pro xy:3128", "spaces"},
    {"control character inside", "http://pro\nxy:3128", "control"},
    {"IPv6 without brackets", "http://::1:3128", "without brackets"},
    {"bare IPv6 without brackets", "2001:db8::1", "without brackets"},
    {"unterminated IPv6", "http://[::1:3128", "unterminated"},
    {"invalid IPv6", "http://[not-v6]:3128", "invalid IPv6"},
    {"empty brackets", "http://[]:3128", "invalid IPv6"},
    {"IPv6 zone", "http://[fe80::1%25eth0]:3128", "invalid IPv6"},
    {"junk after IPv6", "http://[::1]x", "junk"},
    {"bad escape in password", "http://user:%zz@proxy", "escape"},
    {"truncated escape in password", "http://user:se%4@proxy", "escape"},
    {"trailing % in user", "http://user%:secret@proxy", "escape"},
    {"%00 in password", "http://user:a%00b@proxy", "escape"},
    {"escape in host", "http://pro%78y:3128", "invalid host"},
    {"'!' in host", "http://ex!ample:3128", "invalid host"},
};

static void t_bad(void **state)
{
    const struct bad_row *r = *state;
    struct proxy p;
    const char *why = NULL;
    memset(&p, 0x5a, sizeof p); /* proxy_parse must not rely on it being empty */
    assert_int_equal(proxy_parse(&p, r->url, &why), -1);
    assert_non_null(why);
    if (!strstr(why, r->why))
        fail_msg("reason \"%s\" does not mention \"%s\"", why, r->why);
    assert_null(strstr(why, "secret")); /* reasons never quote the URL */
    assert_null(p.host);
    assert_null(p.authorization);
    assert_null(p.description);
    proxy_free(&p);
}

static void t_too_long(void **state)
{
    (void)state;
    struct proxy p;
    const char *why = NULL;
    char *url = malloc(PROXY_URL_MAX + 64);
    assert_non_null(url);
    strcpy(url, "http://");
    memset(url + 7, 'a', PROXY_URL_MAX);
    strcpy(url + 7 + PROXY_URL_MAX, ":3128");
    assert_int_equal(proxy_parse(&p, url, &why), -1);
    assert_non_null(strstr(why, "too long"));
    free(url);
}

static void t_host_too_long(void **state)
{
    (void)state;
    struct proxy p;
    const char *why = NULL;
    char url[PROXY_HOST_MAX + 64];
    strcpy(url, "http://");
    memset(url + 7, 'a', PROXY_HOST_MAX + 1);
    strcpy(url + 7 + PROXY_HOST_MAX + 1, ":3128");
    assert_int_equal(proxy_parse(&p, url, &why), -1);
    assert_non_null(strstr(why, "too long"));
    /* One byte less is fine. */
    memmove(url + 7, url + 8, strlen(url + 8) + 1);
    assert_int_equal(proxy_parse(&p, url, &why), 0);
    assert_int_equal(strlen(p.host), PROXY_HOST_MAX);
    proxy_free(&p);
}

/* PROXY_CRED_MAX decoded bytes of password are accepted, one more is not. */
static void t_password_length(void **state)
{
    (void)state;
    struct proxy p;
    const char *why = NULL;
    char url[3 * PROXY_CRED_MAX + 64];
    size_t o = (size_t)sprintf(url, "http://u:");
    for (int i = 0; i < PROXY_CRED_MAX; i++)
        o += (size_t)sprintf(url + o, "%%41"); /* "A" */
    strcpy(url + o, "@proxy");
    assert_int_equal(proxy_parse(&p, url, &why), 0);
    assert_non_null(p.authorization);
    assert_string_equal(proxy_describe(&p), "http://u:***@proxy:80");
    proxy_free(&p);
    sprintf(url + o, "%%41@proxy");
    assert_int_equal(proxy_parse(&p, url, &why), -1);
    assert_null(p.authorization);
}

/* ---- proxy_redact ------------------------------------------------------------------------- */

struct redact_row {
    const char *name;
    const char *url;
    const char *out;
};

static const struct redact_row redact_rows[] = {
    {"password masked", "http://user:secret@proxy:3128", "http://user:***@proxy:3128"},
    {"no scheme", "user:secret@proxy:3128", "user:***@proxy:3128"},
    {"raw '@' in the password", "http://u:se@cret@proxy/", "http://u:***@proxy/"},
    {"https URL is still masked", "https://u:secret@proxy", "https://u:***@proxy"},
    {"no credentials", "http://proxy:3128", "http://proxy:3128"},
    {"user only", "http://user@proxy:3128", "http://user@proxy:3128"},
    {"IPv6 without credentials", "http://[::1]:3128", "http://[::1]:3128"},
    {"empty", "", ""},
    {"no scheme, '://' later in the value", "svc:Hunter2pw@proxy.example:3128/?next=http://x",
     "svc:***@proxy.example:3128/?next=http://x"},
    {"no scheme, '://' inside the password", "user:p://w@proxy:3128", "user:***@proxy:3128"},
    {"':' before '://'", "a:b://u:pw@proxy", "a:***@proxy"},
    {"invalid scheme before '://'", "=p://w@proxy:3128", "=p:***@proxy:3128"},
    {"blanks before the scheme", " http://u:pw@proxy", " http://u:***@proxy"},
    {"control characters kept off the line", "http://u:p@proxy\n:3128", "http://u:***@proxy?:3128"},
};

static void t_redact(void **state)
{
    const struct redact_row *r = *state;
    char out[REDACT_MAX];
    assert_string_equal(proxy_redact(r->url, out, sizeof out), r->out);
}

static void t_redact_truncates(void **state)
{
    (void)state;
    char out[12];
    assert_string_equal(proxy_redact("http://user:secret@proxy:3128", out, sizeof out),
                        "http://user");
    assert_string_equal(proxy_redact(NULL, out, sizeof out), "");
}

/* ---- proxy_bypass ------------------------------------------------------------------------- */

struct bypass_row {
    const char *name;
    const char *no_proxy;
    const char *host;
    const char *port;
    int want;
};

static const struct bypass_row bypass_rows[] = {
    {"NULL list", NULL, "example.com", "443", 0},
    {"empty list", "", "example.com", "443", 0},
    {"only separators and spaces", " , ,, ", "example.com", "443", 0},
    {"star matches all", "*", "login.microsoftonline.com", "443", 1},
    {"star with spaces", "  *  ", "example.com", "443", 1},
    {"star among others", "foo.com,*", "example.com", "443", 1},
    {"star matches IPs", "*", "10.1.2.3", "443", 1},
    {"star inside a name is literal", "*example.com", "a.example.com", "443", 0},
    {"exact domain", "example.com", "example.com", "443", 1},
    {"subdomain", "example.com", "a.example.com", "443", 1},
    {"deep subdomain", "example.com", "a.b.example.com", "443", 1},
    {"suffix without dot does not match", "example.com", "badexample.com", "443", 0},
    {"longer TLD does not match", "example.com", "example.com.evil", "443", 0},
    {"parent does not match", "a.example.com", "example.com", "443", 0},
    {"leading dot matches the domain", ".example.com", "example.com", "443", 1},
    {"leading dot matches subdomains", ".example.com", "a.example.com", "443", 1},
    {"leading dot, suffix without dot", ".example.com", "badexample.com", "443", 0},
    {"*. prefix", "*.example.com", "a.example.com", "443", 1},
    {"*. prefix matches the domain", "*.example.com", "example.com", "443", 1},
    {"case-insensitive", "EXAMPLE.com", "a.Example.COM", "443", 1},
    {"spaces around entries", " foo.org , example.com ", "example.com", "443", 1},
    {"tab around entry", "\texample.com\t", "example.com", "443", 1},
    {"second of three", "a.org,example.com,b.org", "x.example.com", "443", 1},
    {"none of several", "a.org,b.org", "example.com", "443", 0},
    {"trailing dot on entry", "example.com.", "example.com", "443", 1},
    {"trailing dot on host", "example.com", "example.com.", "443", 1},
    {"Entra authority", "microsoftonline.com", "login.microsoftonline.com", "443", 1},
    {"Entra authority, other suffix", "online.com", "login.microsoftonline.com", "443", 0},
    {"lone dot matches nothing", ".", "example.com", "443", 0},
    {"port matches", "example.com:443", "example.com", "443", 1},
    {"port differs", "example.com:443", "example.com", "8443", 0},
    {"port entry, subdomain", "example.com:443", "a.example.com", "443", 1},
    {"port entry, no port given", "example.com:443", "example.com", NULL, 0},
    {"portless entry, no port given", "example.com", "example.com", NULL, 1},
    {"invalid port never matches", "example.com:https", "example.com", "443", 0},
    {"empty port never matches", "example.com:", "example.com", "443", 0},
    {"IPv4 exact", "10.1.2.3", "10.1.2.3", "443", 1},
    {"IPv4 other", "10.1.2.3", "10.1.2.30", "443", 0},
    {"IPv4 with port", "10.1.2.3:443", "10.1.2.3", "443", 1},
    {"IPv4 other port", "10.1.2.3:443", "10.1.2.3", "80", 0},
    {"IP entry never matches a name", "127.0.0.1", "localhost", "443", 0},
    {"names never match an IP host by suffix", "1.2.3", "10.1.2.3", "443", 0},
    {"localhost", "localhost", "localhost", "443", 1},
    {"IPv6 exact", "::1", "::1", "443", 1},
    {"IPv6 host in brackets", "::1", "[::1]", "443", 1},
    {"IPv6 compared as an address", "0:0::1", "::1", "443", 1},
    {"IPv6 upper case", "FD00::A", "fd00::a", "443", 1},
    {"IPv6 entry in brackets", "[::1]", "::1", "443", 1},
    {"IPv6 entry with port", "[::1]:443", "::1", "443", 1},
    {"IPv6 entry, other port", "[::1]:443", "::1", "80", 0},
    {"IPv6 other", "::1", "::2", "443", 0},
    {"CIDR /8 inside", "10.0.0.0/8", "10.200.3.4", "443", 1},
    {"CIDR /8 outside", "10.0.0.0/8", "11.0.0.1", "443", 0},
    {"CIDR /16", "192.168.0.0/16", "192.168.255.1", "443", 1},
    {"CIDR /16 outside", "192.168.0.0/16", "192.169.0.1", "443", 0},
    {"CIDR /12 inside", "172.16.0.0/12", "172.31.255.255", "443", 1},
    {"CIDR /12 outside", "172.16.0.0/12", "172.32.0.0", "443", 0},
    {"CIDR /32", "10.1.2.3/32", "10.1.2.3", "443", 1},
    {"CIDR /0", "0.0.0.0/0", "1.2.3.4", "443", 1},
    {"CIDR never matches a name", "10.0.0.0/8", "10.example", "443", 0},
    {"IPv6 CIDR /128", "::1/128", "::1", "443", 1},
    {"IPv6 CIDR /128 other", "::1/128", "::2", "443", 0},
    {"IPv6 CIDR /8", "fd00::/8", "fd12:3456::1", "443", 1},
    {"IPv6 CIDR /8 outside", "fd00::/8", "fe80::1", "443", 0},
    {"IPv6 CIDR /7", "fc00::/7", "fd00::1", "443", 1},
    {"IPv6 CIDR vs IPv4 host", "::/0", "1.2.3.4", "443", 0},
    {"IPv4 CIDR vs IPv6 host", "0.0.0.0/0", "::1", "443", 0},
    {"CIDR prefix too long", "10.0.0.0/33", "10.0.0.1", "443", 0},
    {"CIDR prefix not a number", "10.0.0.0/x", "10.0.0.1", "443", 0},
    {"CIDR with a name", "example.com/8", "example.com", "443", 0},
    {"CIDR among names", "foo.org, 10.0.0.0/8", "10.9.9.9", "443", 1},
    {"several colons, not IPv6", "a:b:c", "a", "443", 0},
    {"empty host", "example.com", "", "443", 0},
};

static void t_bypass(void **state)
{
    const struct bypass_row *r = *state;
    assert_int_equal(proxy_bypass(r->no_proxy, r->host, r->port), r->want);
}

static void t_bypass_long_entries(void **state)
{
    (void)state;
    char list[1200];
    memset(list, 'a', 1000);
    strcpy(list + 1000, ",example.com");
    assert_int_equal(proxy_bypass(list, "example.com", "443"), 1); /* long entry skipped */
    assert_int_equal(proxy_bypass("example.com", NULL, "443"), 0);
}

/* ---- proxy_answer: the proxy's answer to CONNECT ------------------------------------------ */

#define OK_200 "HTTP/1.1 200 Connection established\r\n\r\n"

struct answer_row {
    const char *name;
    const char *in;
    size_t max;   /* the cap; 0 = 8192 */
    size_t chunk; /* fed this many bytes at a time; 0 = all at once */
    int want;     /* the last result */
    int status;   /* OPEN and REFUSED */
    const char *reason;
    size_t tail;     /* OPEN: bytes after the answer that belong to the tunnel */
    const char *why; /* REFUSED and BAD: the start of why */
};

static const struct answer_row answer_rows[] = {
    {"200 in one read", OK_200, 0, 0, PROXY_ANSWER_OPEN, 200, "Connection established", 0, NULL},
    {"200 a byte at a time", OK_200, 0, 1, PROXY_ANSWER_OPEN, 200, "Connection established", 0,
     NULL},
    {"tunnel bytes after the answer", OK_200 "\x16\x03\x01", 0, 0, PROXY_ANSWER_OPEN, 200,
     "Connection established", 3, NULL},
    {"headers are skipped", "HTTP/1.1 200 OK\r\nVia: 1.1 squid\r\nContent-Length: 0\r\n\r\n", 0, 7,
     PROXY_ANSWER_OPEN, 200, "OK", 0, NULL},
    {"HTTP/1.0", "HTTP/1.0 200 OK\r\n\r\n", 0, 0, PROXY_ANSWER_OPEN, 200, "OK", 0, NULL},
    {"any 2xx opens", "HTTP/1.1 204 No Content\r\n\r\n", 0, 0, PROXY_ANSWER_OPEN, 204, "No Content",
     0, NULL},
    {"interim 100 skipped", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Tunnel\r\n\r\nTLS", 0, 0,
     PROXY_ANSWER_OPEN, 200, "Tunnel", 3, NULL},
    {"interim 100 skipped, in pieces", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Tunnel\r\n\r\n",
     0, 5, PROXY_ANSWER_OPEN, 200, "Tunnel", 0, NULL},
    {"reason truncated",
     "HTTP/1.1 200 "
     "0123456789012345678901234567890123456789012345678901234567890123XYZ\r\n\r\n",
     0, 0, PROXY_ANSWER_OPEN, 200,
     "0123456789012345678901234567890123456789012345678901234567890123", 0, NULL},
    {"407 refused",
     "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n", 0, 0,
     PROXY_ANSWER_REFUSED, 407, "Proxy Authentication Required", 0,
     "proxy answered CONNECT with 407 Proxy Authentication Required"},
    {"403 refused in pieces", "HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope!", 0, 3,
     PROXY_ANSWER_REFUSED, 403, "Forbidden", 0, "proxy answered CONNECT with 403 Forbidden"},
    {"502 refused", "HTTP/1.1 502 Bad Gateway\r\n\r\n", 0, 0, PROXY_ANSWER_REFUSED, 502,
     "Bad Gateway", 0, "proxy answered CONNECT with 502 Bad Gateway"},
    {"3xx refused", "HTTP/1.1 301 Moved\r\nLocation: /\r\n\r\n", 0, 0, PROXY_ANSWER_REFUSED, 301,
     "Moved", 0, "proxy answered CONNECT with 301 Moved"},
    {"not HTTP", "SSH-2.0-OpenSSH_9.2\r\n", 0, 0, PROXY_ANSWER_BAD, 0, NULL, 0,
     "invalid answer to CONNECT: HPE_"},
    {"bad status code", "HTTP/1.1 2x0 OK\r\n\r\n", 0, 0, PROXY_ANSWER_BAD, 0, NULL, 0,
     "invalid answer to CONNECT: HPE_"},
    {"incomplete", "HTTP/1.1 200 OK\r\nVia: x\r\n", 0, 0, PROXY_ANSWER_MORE, 0, NULL, 0, NULL},
    {"nothing yet", "", 0, 0, PROXY_ANSWER_MORE, 0, NULL, 0, NULL},
    {"over the cap", "HTTP/1.1 200 OK\r\nVia: 1.1 a-very-long-proxy-name.example\r\n\r\n", 32, 0,
     PROXY_ANSWER_BAD, 0, NULL, 0, "answer to CONNECT over 32 bytes"},
    {"over the cap in pieces", "HTTP/1.1 200 OK\r\nVia: 1.1 a-very-long-proxy-name.example\r\n\r\n",
     32, 10, PROXY_ANSWER_BAD, 0, NULL, 0, "answer to CONNECT over 32 bytes"},
    {"exactly the cap, tunnel bytes after it", "HTTP/1.1 200 OK\r\n\r\nTLS", 19, 0,
     PROXY_ANSWER_OPEN, 200, "OK", 3, NULL},
};

static void t_answer(void **state)
{
    const struct answer_row *r = *state;
    struct proxy_answer a;
    char why[256] = "";
    size_t n = strlen(r->in), used = 12345, off = 0;
    int rc = PROXY_ANSWER_MORE;
    proxy_answer_init(&a, r->max ? r->max : 8192);
    do {
        size_t k = r->chunk && n - off > r->chunk ? r->chunk : n - off;
        rc = proxy_answer_feed(&a, r->in + off, k, &used, why, sizeof why);
        if (rc == PROXY_ANSWER_OPEN)
            used += off;
        off += k;
    } while (rc == PROXY_ANSWER_MORE && off < n);
    assert_int_equal(rc, r->want);
    if (rc == PROXY_ANSWER_OPEN || rc == PROXY_ANSWER_REFUSED) {
        assert_int_equal(a.status, r->status);
        assert_string_equal(a.reason, r->reason);
        assert_int_equal(a.reason_len, strlen(r->reason));
    }
    if (rc == PROXY_ANSWER_OPEN) {
        assert_int_equal(used, n - r->tail);
        assert_int_equal(off, n); /* every byte fed */
    }
    if (r->why && strncmp(why, r->why, strlen(r->why)) != 0)
        fail_msg("why \"%s\" does not start with \"%s\"", why, r->why);
}

int main(void)
{
    ADD_ROWS("proxy_parse ok", good_rows, t_good);
    ADD_ROWS("proxy_parse refused", bad_rows, t_bad);
    add("proxy_parse refused", "URL over PROXY_URL_MAX", t_too_long, NULL);
    add("proxy_parse", "host length limit", t_host_too_long, NULL);
    add("proxy_parse", "password length limit", t_password_length, NULL);
    ADD_ROWS("proxy_redact", redact_rows, t_redact);
    add("proxy_redact", "truncation and NULL", t_redact_truncates, NULL);
    ADD_ROWS("proxy_bypass", bypass_rows, t_bypass);
    add("proxy_bypass", "over-long entries and NULL host", t_bypass_long_entries, NULL);
    ADD_ROWS("proxy_answer", answer_rows, t_answer);
    return _cmocka_run_group_tests("proxy", tests, ntests, NULL, NULL);
}
