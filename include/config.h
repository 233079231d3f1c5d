/* config.h - settings from the workload-identity environment, overridable by flags. */
#ifndef IMDSD_CONFIG_H
#define IMDSD_CONFIG_H

#include <stddef.h>

#include "imds.h"
#include "log.h"
#include "proxy.h"

#define CONFIG_MAX_LISTEN        8
#define CONFIG_LISTEN_STR        72 /* config_listen_str's output, NUL included */
#define CONFIG_MAX_CLIENT_IDS    32
#define CONFIG_MAX_ALIASES       64
#define CONFIG_MAX_HOSTS         16
#define CONFIG_MAX_RESOURCES     32
#define CONFIG_MAX_PREFETCH      16
#define CONFIG_MAX_SECRET        255 /* bytes of the X-IDENTITY-HEADER secret */
#define CONFIG_DEFAULT_LISTEN    "127.0.0.1:8000"
#define CONFIG_DEFAULT_AUTHORITY "https://login.microsoftonline.com/"
#define CONFIG_DEFAULT_CA_FILE   "/etc/ssl/certs/ca-certificates.crt"
/* bytes of the secret's file read, at most: a file this long or longer is refused */
#define CONFIG_SECRET_READ (CONFIG_MAX_SECRET + 3)

struct config_listen {
    char host[64]; /* numeric IPv4 or IPv6 address, no brackets */
    int port;
    int health; /* --health-listen: probes only, never a token */
};

/* An https:// URL, parsed. */
struct config_url {
    char *url;  /* normalised "https://host[:port][/prefix]", no trailing '/' */
    char *host; /* host name or IP literal, no brackets */
    char port[6];
    char *path; /* "" or "/prefix" */
};

/* --prefetch [ID=]RESOURCE: a token fetched at start and kept fresh, never evicted. */
struct config_prefetch {
    char *id;              /* ID as given (client, object or ARM resource id), or NULL */
    char *resource;        /* exactly as applications will ask for it (the cache's key) */
    const char *client_id; /* the served client id it selects: the default, an --allow-client-id
                              or an --identity-alias's (borrowed from this config) */
};

struct config {
    char *client_id;
    char *tenant_id;
    char *token_file;
    char *authority;      /* normalised "https://host[:port][/prefix]", no trailing '/' */
    char *authority_host; /* host name or IP literal, no brackets */
    char authority_port[6];
    char *authority_path; /* "" or "/prefix" */
    char *ca_file;
    /* An AKS identity binding (the webhook's AZURE_KUBERNETES_* variables): the exchange goes to
     * token_proxy (url NULL: straight to the authority), verified as sni_name (NULL: its host)
     * against the trust anchors in k8s_ca_file (read again before every exchange) or
     * k8s_ca_data (neither: ca_file) */
    struct config_url token_proxy;
    char *token_proxy_src; /* what set it: the variable or the flag */
    char *sni_name;
    char *k8s_ca_file;
    char *k8s_ca_data;
    struct config_listen listen[CONFIG_MAX_LISTEN];
    int nlisten;
    char *allowed_client_ids[CONFIG_MAX_CLIENT_IDS];
    int nallowed;
    struct imds_alias aliases[CONFIG_MAX_ALIASES];
    int naliases;
    char *allowed_hosts[CONFIG_MAX_HOSTS]; /* --allow-host */
    int nallowed_hosts;
    char *allowed_resources[CONFIG_MAX_RESOURCES]; /* --allow-resource; none: every resource */
    int nallowed_resources;
    struct config_prefetch prefetch[CONFIG_MAX_PREFETCH];
    int nprefetch;
    char *identity_header_file; /* enables the App Service endpoint */
    char *identity_header;      /* its secret content (owned, zeroed on free) */
    size_t identity_header_len;
    struct proxy proxy; /* HTTPS_PROXY, when set and NO_PROXY does not exempt the authority */
    int use_proxy;
    enum log_level log_level;
    enum log_format log_format;
    unsigned max_connections;
    unsigned max_health_connections; /* --health-listen's pool */
    unsigned idle_timeout_s;
    unsigned header_timeout_s; /* a request still arriving after this is dropped */
    unsigned entra_timeout_s;
    unsigned shutdown_grace_s;
    unsigned identity_header_overlap_s; /* a replaced secret is still accepted this long */
    char *arc_key_dir;    /* --arc-key-dir: the Azure Arc challenge on the IMDS path, when set */
    long arc_gid;         /* --arc-key-group, -1 when not given */
    char add_address[16]; /* --add-loopback-address: the one-shot init mode, when not empty */
    unsigned proxy_port;  /* --proxy-port: the proxy sidecar's flag, a --listen 127.0.0.1:N */
    int probe;            /* --probe: 1 with an address (one GET), 2 alone (until imdsd is ready) */
    struct config_listen probe_at;
    char probe_path[64];
};

enum config_result { CONFIG_OK = 0, CONFIG_EXIT = 1, CONFIG_ERROR = -1 };

typedef const char *config_getenv_fn(const char *name);

/* Fills c from getenv (the AZURE_* variables) and argv (flags win). Returns CONFIG_OK,
 * CONFIG_EXIT after printing --help/--version to stdout, or CONFIG_ERROR with one line in err
 * naming the setting and its value. c must be freed with config_free() in every case. */
int config_parse(struct config *c, int argc, char **argv, config_getenv_fn *getenv_fn, char *err,
                 size_t errlen);
void config_free(struct config *c);

/* Reads the --identity-header-file secret into c; 0 or -1 with a one-line reason in err. */
int config_load_identity_header(struct config *c, char *err, size_t errlen);
/* Pure: trims the secret file's n bytes and checks them (not empty, at most CONFIG_MAX_SECRET
 * bytes, sendable in an HTTP header). Returns the trimmed length and sets *start, or 0 with *why
 * set. The start-up read and secret_watch's re-reads both use it, reading at most
 * CONFIG_SECRET_READ bytes: n == CONFIG_SECRET_READ is a file too long to hold a secret. */
size_t config_check_secret(const char *buf, size_t n, size_t *start, const char **why);
/* Parses "ADDR:PORT" / "[v6]:PORT" into l; returns 0 or -1. */
int config_parse_listen(const char *s, struct config_listen *l);
/* Writes l as "ADDR:PORT" / "[v6]:PORT" into out; returns out. */
const char *config_listen_str(const struct config_listen *l, char out[CONFIG_LISTEN_STR]);
/* The identities (and Host names) c serves, as imds.c resolves requests against them; borrows
 * from c. Inline: the code that uses it (endpoints.c, in fuzz_http too) need not link config.c. */
static inline struct imds_identities config_identities(const struct config *c)
{
    return (struct imds_identities){.default_client_id = c->client_id,
                                    .allowed = c->allowed_client_ids,
                                    .nallowed = c->nallowed,
                                    .aliases = c->aliases,
                                    .naliases = c->naliases,
                                    .allowed_hosts = c->allowed_hosts,
                                    .nallowed_hosts = c->nallowed_hosts};
}
/* Normalises an authority URL into c->authority* fields; returns 0 or -1 with a reason. */
int config_set_authority(struct config *c, const char *url, const char **why);
/* Parses an https:// URL (no user name, query or fragment) into u, freeing what u held; returns 0
 * or -1 with a reason ("must be an https:// URL"). */
int config_parse_url(struct config_url *u, const char *url, const char **why);
void config_url_free(struct config_url *u);

#endif
