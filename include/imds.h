/* imds.h - pure IMDS request handling: path normalisation, request validation, identity selection
 * and the rendering of token and error responses. No I/O, no clock (now is an argument). */
#ifndef IMDSD_IMDS_H
#define IMDSD_IMDS_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "entra_msg.h"
#include "form.h"
#include "token.h"

#define IMDS_MAX_RESOURCE 2048 /* decoded bytes; longer is a client error */
#define IMDS_MAX_HOST     300  /* a longer Host is refused */

#define IMDS_MAX_PATH 64 /* a normalised path this long or longer names no route */

/* Writes a request path (len bytes, without the query) as routes are named: repeated '/'
 * collapse, one trailing '/' is dropped, letters are lower case. Returns 0, or -1 when that takes
 * size bytes or more (NUL included). */
int imds_path_normalize(const char *path, size_t len, char *out, size_t size);

struct imds_error {
    int status;              /* HTTP status */
    const char *error;       /* OAuth-style code */
    const char *description; /* human text */
    int retry_after;         /* seconds for Retry-After, 0 = no header */
};

/* What the request handler knows about a token request before validation. */
struct imds_input {
    int is_get;
    int has_metadata_true; /* a Metadata header equal to "true", any case */
    int has_xff;           /* an X-Forwarded-For header */
    int has_body;          /* the request had body bytes */
    const char *host;      /* the Host header, NULL when absent */
    size_t host_len;
    const char *query; /* raw query string (after '?'), may be NULL */
    size_t query_len;
    const char *identity_header; /* X-IDENTITY-HEADER value, or NULL when absent */
    size_t identity_header_len;
    const char *legacy_secret; /* the `secret` header (App Service 2017-09-01), or NULL */
    size_t legacy_secret_len;
    int is_post;
    const char *body; /* a POST's body */
    size_t body_len;
    int form_body; /* Content-Type: application/x-www-form-urlencoded */
};

/* An object/principal id (GUID) or ARM resource id that names one of the served client ids. */
struct imds_alias {
    char *key;
    char *client_id;
};

/* The identities this daemon may serve, and the host names it serves them under. */
struct imds_identities {
    const char *default_client_id;
    char *const *allowed; /* extra client ids */
    int nallowed;
    const struct imds_alias *aliases;
    int naliases;
    char *const *allowed_hosts; /* names allowed in Host besides localhost (--allow-host) */
    int nallowed_hosts;
};

struct imds_token_req {
    const char *resource; /* decoded, inside the struct query */
    size_t resource_len;
    const char *client_id; /* the selected identity */
    int msi2017;           /* App Service api-version before 2019-08-01: its answer's shape */
    int msi2017_epoch; /* ... from an Azure ML client (it sends Metadata: true): epoch expires_on */
};

/* Whether a token request may name this Host: absent, an IP literal (with a port or not),
 * localhost, or one of names (case-insensitive, a trailing dot ignored). Anything else may be a
 * browser that a DNS rebinding pointed at imdsd, for which the page would be same-origin. */
int imds_host_allowed(const char *host, size_t len, char *const *names, int nnames);
/* Validates a token request in IMDS order: method, Host, no body, X-Forwarded-For, Metadata,
 * query syntax, api-version, resource, identity. Returns 0 and fills out, or -1 and fills err.
 * q is scratch storage that out points into. */
int imds_check_token_request(const struct imds_input *in, const struct imds_identities *ids,
                             struct query *q, struct imds_token_req *out, struct imds_error *err);

/* The same for the App Service protocol at /msi/token: the shared secret replaces the Metadata
 * header and is compared in constant time. api-version 2019-08-01 (IDENTITY_ENDPOINT +
 * IDENTITY_HEADER) sends it as X-IDENTITY-HEADER; 2017-09-01 (MSI_ENDPOINT + MSI_SECRET: Azure
 * ML and older App Service clients) as `secret`, with the identity as `clientid` too, and gets
 * out->msi2017 set. */
struct imds_secret {
    const char *value;
    size_t len;
};
/* secrets: the n (1 or 2, during a rotation's overlap) values the header may have. */
int imds_check_appservice_request(const struct imds_input *in, const struct imds_identities *ids,
                                  const struct imds_secret *secrets, int n, struct query *q,
                                  struct imds_token_req *out, struct imds_error *err);

/* The Cloud Shell protocol (MSI_ENDPOINT alone): POST with Metadata: true and a form body
 * (resource, and optionally client_id, msi_res_id and the other selectors), no api-version; the
 * query string is not read. Host and X-Forwarded-For as for GET. */
int imds_check_cloudshell_request(const struct imds_input *in, const struct imds_identities *ids,
                                  struct query *q, struct imds_token_req *out,
                                  struct imds_error *err);

/* Resolves the identity a request selects (client_id, object_id/principal_id, msi_res_id/
 * mi_res_id/msi-res-id) to a served client id, or NULL ("Identity not found"). *several is set
 * when more than one selector is present. */
const char *imds_select_identity(const struct query *q, const struct imds_identities *ids,
                                 int *several);

/* The served client id that id names: a client id served, or an alias's key; NULL if none. */
const char *imds_resolve_identity(const struct imds_identities *ids, const char *id);
/* Whether a configured resource (--prefetch) is one a request could name: 1 to IMDS_MAX_RESOURCE
 * bytes of UTF-8, no spaces or control characters. */
int imds_resource_ok(const char *r, size_t n);

/* Maps a failed Entra exchange to what IMDS clients understand (trap T4): permanent AADSTS
 * rejections -> 400 with Entra's code and text, throttling -> 429 + Retry-After, the rest -> 5xx.
 */
void imds_error_from_entra(const struct entra_result *r, struct imds_error *err);

/* Appends the IMDS 200 body for tok; every field is a JSON string, expires_in counts down. */
int imds_render_token(struct buf *b, const struct token *tok, const char *client_id,
                      const char *resource, size_t resource_len, int64_t now);
/* The App Service 2019-08-01 body: like IMDS but without expires_in and ext_expires_in. */
int imds_render_appservice_token(struct buf *b, const struct token *tok, const char *client_id,
                                 const char *resource, size_t resource_len);
/* The 2017-09-01 body: access_token, client_id, expires_on, resource, token_type. expires_on is
 * what the caller's kind of client parses: App Service 2017 returned a UTC date
 * "MM/DD/YYYY HH:MM:SS +00:00" (adal, the older libraries, azure-identity parse it), Azure ML,
 * whose clients send Metadata: true, epoch seconds (msal-node reads a date as "expired now"). */
int imds_render_msi2017_token(struct buf *b, const struct token *tok, const char *client_id,
                              const char *resource, size_t resource_len, int epoch);
/* Appends {"error":..,"error_description":..}. */
int imds_render_error(struct buf *b, const struct imds_error *err);
/* The same plus App Service's "statusCode" and "message" members. */
int imds_render_appservice_error(struct buf *b, const struct imds_error *err);
/* Compares a and b in time that depends only on their lengths. */
int imds_secret_equal(const char *a, size_t alen, const char *b, size_t blen);
/* True for an ARM resource id of the form "/subscriptions/...", no spaces or controls. */
int imds_is_resource_id(const char *s);

/* --allow-resource: whether resource (len bytes) matches one of patterns (none: all do). A
 * pattern matches the same URI ignoring case and one trailing '/'; a '*' in the pattern's host
 * name stands for one or more characters other than '/', '.', '?' and '#': "https://" "*"
 * ".vault.azure.net" matches https://myvault.vault.azure.net, not https://vault.azure.net nor
 * https://a.b.vault.azure.net. */
int imds_resource_allowed(const char *resource, size_t len, char *const *patterns, int n);
/* Whether s may be an --allow-resource pattern: printable, no spaces, at most one '*', and that
 * one in the host name (between "://" and the next '/'). */
int imds_resource_pattern_ok(const char *s);

/* Supported api-version: YYYY-MM-DD, a real date, not before 2018-02-01. */
int imds_api_version_ok(const char *v);
/* True when s is a GUID (8-4-4-4-12 hex digits). */
int imds_is_guid(const char *s);

#endif
