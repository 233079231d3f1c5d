/* endpoints.h - the HTTP handler: the routes (the token endpoints of IMDS, App Service and Cloud
 * Shell, /healthz, /readyz, /metrics), which listener serves which, and the IMDS error bodies. */
#ifndef IMDSD_ENDPOINTS_H
#define IMDSD_ENDPOINTS_H

#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "http_server.h"
#include "imds.h"
#include "token_cache.h"
#include "arc.h"
#include "secret_watch.h"
#include "token_file.h"

/* Listener tags (http_server_listen): what a listener serves. */
enum endpoints_listener {
    LISTENER_TOKENS, /* tokens, /healthz and /readyz */
    LISTENER_HEALTH, /* /healthz and /readyz only: may face the pod network, for the kubelet */
};

/* What a request path names: routes[] in endpoints.c has a row for each path. */
enum endpoints_route {
    ROUTE_NOT_FOUND,
    ROUTE_TOKEN,      /* /metadata/identity/oauth2/token: IMDS (GET), Cloud Shell (POST) */
    ROUTE_APPSERVICE, /* /msi/token: App Service 2019-08-01 and 2017-09-01 */
    ROUTE_HEALTHZ,
    ROUTE_READYZ,
    ROUTE_METRICS,
};

/* The route a request path (without the query) names, whatever the listener and configuration:
 * repeated '/' collapse, one trailing '/' is dropped, comparison ignores case. */
enum endpoints_route endpoints_route(const char *path, size_t len);

struct endpoints {
    uv_loop_t *loop;
    const struct config *cfg;
    struct token_cache *cache;
    struct token_file *tf;
    struct imds_identities ids;
    uint64_t refused_hosts;       /* token requests refused for their Host */
    struct secret_watch *secrets; /* the App Service secret(s), NULL when off */
    struct arc *arc;              /* the Azure Arc challenge on the IMDS path, NULL when off */
};

/* Sets ep up to answer for cfg from cache and tf, with the Azure Arc challenge when
 * cfg->arc_key_dir is set and the App Service secret (re-read as it rotates) when
 * cfg->identity_header is. Returns 0, or -1 with a one-line reason in err; either way
 * endpoints_free() releases what it made. */
int endpoints_init(struct endpoints *ep, uv_loop_t *loop, const struct config *cfg,
                   struct token_cache *cache, struct token_file *tf, char *err, size_t errlen);
/* SIGHUP: re-reads the App Service secret's file (when there is one) at once. */
void endpoints_reload(struct endpoints *ep);
/* Releases what endpoints_init made; a zeroed ep is fine. Free the HTTP server first: aborting
 * the requests it holds uses the Azure Arc challenge and the cache. */
void endpoints_free(struct endpoints *ep);
/* An http_handler_cb; arg is a struct endpoints. */
void endpoints_handle(struct http_conn *c, const struct http_request *req, void *arg);
/* An http_error_body_cb (http_server_opts.error_body): the IMDS error body, with the code IMDS
 * gives for the status (400 invalid_request, 503 service_unavailable, else bad_request) and
 * reason as its error_description. arg is unused. */
void endpoints_error_body(struct buf *b, int status, const char *reason, void *arg);

#endif
