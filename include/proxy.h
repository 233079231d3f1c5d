/* proxy.h - HTTP CONNECT proxy settings: HTTPS_PROXY URL parsing and NO_PROXY matching.
 *
 * Pure string handling, no I/O. The URL forms accepted are those curl and Go accept in
 * HTTPS_PROXY / https_proxy:
 *
 *     http://[user[:password]@]host[:port][/]      (scheme case-insensitive, port default 80)
 *     [user[:password]@]host[:port]                 (no scheme: taken as http://, like curl)
 *
 * host is a DNS name, an IPv4 literal or an IPv6 literal in brackets; user and password are
 * percent-decoded. https:// proxies (TLS to the proxy) and every other scheme are refused.
 *
 * Suggested look-up order (the one Go uses): HTTPS_PROXY, then https_proxy, the first that is set
 * and not empty; likewise NO_PROXY, then no_proxy. */
#ifndef IMDSD_PROXY_H
#define IMDSD_PROXY_H

#include <stddef.h>

#define PROXY_DEFAULT_PORT "80"
#define PROXY_URL_MAX      2048 /* longer HTTPS_PROXY values are refused */
#define PROXY_HOST_MAX     253  /* bytes of a host name or IP literal (without brackets) */
#define PROXY_CRED_MAX     256  /* decoded bytes of the user name, and of the password */
#define PROXY_PORT_LEN     6    /* "65535" + NUL */

struct proxy {
    char *host;                /* DNS name or IP literal without brackets */
    char port[PROXY_PORT_LEN]; /* decimal */
    char *authorization;       /* "Basic <base64(user:password)>", or NULL without credentials;
                                * a secret: never log it (proxy_free zeroes it) */
    char *description;         /* the URL for logs, password replaced by "***" */
};

/* Parses url into *p (which it overwrites without freeing). Returns 0, or -1 with *why set to a
 * static, log-safe English reason (it never quotes the URL, which may hold a password); *p is
 * then empty and proxy_free() on it is harmless. */
int proxy_parse(struct proxy *p, const char *url, const char **why);

/* Frees what proxy_parse allocated, zeroing the credentials; leaves *p empty. NULL is fine. */
void proxy_free(struct proxy *p);

/* "http://user:***@host:port" (or "http://host:port"), IPv6 hosts bracketed, the user name
 * percent-encoded: safe to log. "" for an empty struct proxy. */
const char *proxy_describe(const struct proxy *p);

/* Copies a raw proxy URL (e.g. a value proxy_parse refused) into out with the password, if it
 * seems to hold one, replaced by "***", for error messages. Returns out (truncated to outlen). */
const char *proxy_redact(const char *url, char *out, size_t outlen);

/* Whether a connection to host:port should bypass the proxy according to a NO_PROXY value:
 * 1 = go direct, 0 = use the proxy. Entries are separated by commas, surrounding spaces ignored,
 * compared case-insensitively:
 *   "*"                  every host;
 *   "example.com", ".example.com", "*.example.com"
 *                        example.com and its subdomains (a.example.com), not badexample.com;
 *   "10.1.2.3", "::1", "[::1]"
 *                        that IP literal (compared as an address);
 *   "10.0.0.0/8", "fd00::/8"
 *                        IP-literal hosts inside that range (names are never resolved);
 *   any of the above but "*" and ranges with ":PORT" ("example.com:443", "[::1]:443")
 *                        only connections to that port.
 * host may be an IPv6 literal with or without brackets; port may be NULL (then entries with a
 * port never match). NULL or empty no_proxy: 0. */
int proxy_bypass(const char *no_proxy, const char *host, const char *port);

#endif
