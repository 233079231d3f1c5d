/* test_config.c - config_parse (fake getenv + argv), config_parse_listen, config_set_authority,
 * config_check_secret and config_load_identity_header (temporary files in /tmp).
 * config_free() runs after every case, including the error ones, so valgrind sees no leak. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"
#include "log.h"

#include "unit.h"
static char *tstrdup(const char *s)
{
    return tcopy(s, strlen(s) + 1);
}

static void config_release(void *p)
{
    config_free(p);
    free(p);
}

/* A zeroed config that the teardown frees with config_free(). */
static struct config *tconfig(void)
{
    struct config *c = calloc(1, sizeof *c);
    if (!c)
        abort();
    return defer(config_release, c);
}

static void file_release(void *p)
{
    fclose(p);
}

/* ---- fake environment ------------------------------------------------------------------------ */

static const char *const *fake_env; /* name, value, name, value, ..., NULL */

static const char *fake_getenv(const char *name)
{
    for (const char *const *p = fake_env; p && *p; p += 2)
        if (strcmp(p[0], name) == 0)
            return p[1];
    return NULL;
}

#define CID        "0a1b2c3d-0000-4000-8000-00000000000a"
#define CID2       "5e6f7a8b-1111-4111-8111-11111111111b"
#define CID3       "77777777-7777-4777-8777-777777777777"
#define TENANT     "72f988bf-86f1-41af-91ab-2d7cd011db47"
#define TOKEN_FILE "/var/run/secrets/azure/tokens/azure-identity-token"
#define PUBLIC     "https://login.microsoftonline.com/"

#define ENV_ID   "AZURE_CLIENT_ID", CID, "AZURE_TENANT_ID", TENANT
#define ENV_BASE ENV_ID, "AZURE_FEDERATED_TOKEN_FILE", TOKEN_FILE
#define ENV_ALL  ENV_BASE, "AZURE_AUTHORITY_HOST", PUBLIC

/* long values for the length limits */
#define X10  "xxxxxxxxxx"
#define X50  X10 X10 X10 X10 X10
#define X250 X50 X50 X50 X50 X50

#define RID "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/uai/app"

/* ---- config_parse ---------------------------------------------------------------------------- */

struct cfg_row {
    const char *name;
    const char *env[20];
    const char *argv[24]; /* without argv[0] */
    int rc;
    /* CONFIG_OK: NULL / 0 fields are not checked */
    const char *client_id, *tenant_id, *token_file, *authority, *host, *port, *path, *ca_file;
    int log_level; /* 0 = not checked, else LOG_x + 1 */
    int nlisten;
    const char *l0_host, *l1_host;
    int l0_port, l1_port;
    int health; /* bit i: listen[i] is a --health-listen (checked when nlisten is) */
    int nallowed;
    const char *allowed0;
    int nhosts;
    const char *host1;
    unsigned max_conn, max_health_conn, idle, entra_timeout;
    int defaults;            /* check every default value */
    const char *add_address; /* the one-shot init mode: only this is set */
    const char *probe;       /* the exec probe: "HOST PORT PATH" */
    int probe_wait;          /* with probe: --probe alone, retried until ready */
    unsigned header_timeout;
    int grace, overlap, log_format; /* 0 = not checked, else VAL(value) */
    const char *arc_key_dir;
    long arc_gid; /* 0 = not checked, else VAL(gid) */
    int naliases;
    const char *alias_key, *alias_client; /* the last alias */
    const char *ih_file;                  /* --identity-header-file (read later, not here) */
    int nresources;
    int proxy;              /* 0 = not checked, 1 = direct (no proxy), 2 = through proxy_desc */
    const char *proxy_desc; /* proxy_describe() */
    /* CONFIG_ERROR: substrings of err, and one it must not hold (a password) */
    const char *err_in[2];
    const char *err_out;
};

#define LVL(l) ((l) + 1)
#define VAL(v) ((v) + 1)

static const struct cfg_row cfg_rows[] = {
    {.name = "env only",
     .env = {ENV_ALL, NULL},
     .rc = CONFIG_OK,
     .client_id = CID,
     .tenant_id = TENANT,
     .token_file = TOKEN_FILE,
     .authority = "https://login.microsoftonline.com",
     .host = "login.microsoftonline.com",
     .port = "443",
     .path = "",
     .defaults = 1},
    {.name = "no AZURE_AUTHORITY_HOST -> public cloud",
     .env = {ENV_BASE, NULL},
     .rc = CONFIG_OK,
     .authority = "https://login.microsoftonline.com",
     .host = "login.microsoftonline.com",
     .port = "443",
     .path = "",
     .defaults = 1},
    {.name = "empty AZURE_AUTHORITY_HOST -> public cloud",
     .env = {ENV_BASE, "AZURE_AUTHORITY_HOST", "", NULL},
     .rc = CONFIG_OK,
     .authority = "https://login.microsoftonline.com"},
    {.name = "US Gov authority from the webhook (trailing slash)",
     .env = {ENV_BASE, "AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/", NULL},
     .rc = CONFIG_OK,
     .authority = "https://login.microsoftonline.us",
     .host = "login.microsoftonline.us",
     .port = "443",
     .path = ""},
    {.name = "IMDSD_LOG_LEVEL and IMDSD_CA_FILE from env",
     .env = {ENV_ALL, "IMDSD_LOG_LEVEL", "warn", "IMDSD_CA_FILE", "/etc/ca.pem", NULL},
     .rc = CONFIG_OK,
     .log_level = LVL(LOG_WARN),
     .ca_file = "/etc/ca.pem"},
    {.name = "flags only",
     .env = {NULL},
     .argv = {"--client-id", CID, "--tenant-id", "contoso.onmicrosoft.com", "--token-file",
              "/tmp/token", NULL},
     .rc = CONFIG_OK,
     .client_id = CID,
     .tenant_id = "contoso.onmicrosoft.com",
     .token_file = "/tmp/token",
     .authority = "https://login.microsoftonline.com",
     .defaults = 1},
    {.name = "flags override env",
     .env = {ENV_ALL, "IMDSD_LOG_LEVEL", "warn", "IMDSD_CA_FILE", "/etc/ca.pem", NULL},
     .argv = {"--client-id", CID2, "--tenant-id", "contoso.onmicrosoft.com", "--token-file",
              "/tmp/token", "--authority-host", "https://127.0.0.1:8443/", "--ca-file",
              "/tmp/ca.pem", "--log-level", "debug", NULL},
     .rc = CONFIG_OK,
     .client_id = CID2,
     .tenant_id = "contoso.onmicrosoft.com",
     .token_file = "/tmp/token",
     .authority = "https://127.0.0.1:8443",
     .host = "127.0.0.1",
     .port = "8443",
     .path = "",
     .ca_file = "/tmp/ca.pem",
     .log_level = LVL(LOG_DEBUG)},
    {.name = "--opt=value form",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen=127.0.0.1:9000", "--client-id=" CID2, NULL},
     .rc = CONFIG_OK,
     .client_id = CID2,
     .nlisten = 1,
     .l0_host = "127.0.0.1",
     .l0_port = 9000},
    {.name = "valid --authority-host overrides a bad AZURE_AUTHORITY_HOST",
     .env = {ENV_BASE, "AZURE_AUTHORITY_HOST", "http://login.microsoftonline.com/", NULL},
     .argv = {"--authority-host", "https://login.chinacloudapi.cn/", NULL},
     .rc = CONFIG_OK,
     .authority = "https://login.chinacloudapi.cn"},
    {.name = "valid --log-level overrides a bad IMDSD_LOG_LEVEL",
     .env = {ENV_ALL, "IMDSD_LOG_LEVEL", "loud", NULL},
     .argv = {"--log-level", "debug", NULL},
     .rc = CONFIG_OK,
     .log_level = LVL(LOG_DEBUG)},
    {.name = "--listen twice, IPv4 and IPv6",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "127.0.0.1:9000", "--listen", "[::1]:9001", NULL},
     .rc = CONFIG_OK,
     .nlisten = 2,
     .l0_host = "127.0.0.1",
     .l0_port = 9000,
     .l1_host = "::1",
     .l1_port = 9001},
    {.name = "--listen 8 times",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "127.0.0.1:1", "--listen", "127.0.0.1:2", "--listen", "127.0.0.1:3",
              "--listen", "127.0.0.1:4", "--listen", "127.0.0.1:5", "--listen", "127.0.0.1:6",
              "--listen", "127.0.0.1:7", "--listen", "127.0.0.1:8", NULL},
     .rc = CONFIG_OK,
     .nlisten = 8,
     .l0_host = "127.0.0.1",
     .l0_port = 1},
    {.name = "--allow-client-id twice",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-client-id", CID2, "--allow-client-id", CID3, NULL},
     .rc = CONFIG_OK,
     .nallowed = 2,
     .allowed0 = CID2},
    {.name = "--health-listen alone: the default token listener too",
     .env = {ENV_ALL, NULL},
     .argv = {"--health-listen", "0.0.0.0:8001", NULL},
     .rc = CONFIG_OK,
     .nlisten = 2,
     .health = 1,
     .l0_host = "0.0.0.0",
     .l0_port = 8001,
     .l1_host = "127.0.0.1",
     .l1_port = 8000},
    {.name = "--listen and --health-listen",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "127.0.0.1:9000", "--health-listen", "[::]:9001", NULL},
     .rc = CONFIG_OK,
     .nlisten = 2,
     .health = 2,
     .l0_host = "127.0.0.1",
     .l0_port = 9000,
     .l1_host = "::",
     .l1_port = 9001},
    {.name = "--allow-host twice",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-host", "imdsd", "--allow-host", "imds.example.internal", NULL},
     .rc = CONFIG_OK,
     .nhosts = 2,
     .host1 = "imds.example.internal"},
    {.name = "numeric limits",
     .env = {ENV_ALL, NULL},
     .argv = {"--max-connections", "10", "--idle-timeout", "5", "--entra-timeout", "300",
              "--max-health-connections", "3", NULL},
     .rc = CONFIG_OK,
     .max_conn = 10,
     .max_health_conn = 3,
     .idle = 5,
     .entra_timeout = 300},
    /* errors: each names the setting and shows the value */
    {.name = "AZURE_CLIENT_ID missing",
     .env = {"AZURE_TENANT_ID", TENANT, "AZURE_FEDERATED_TOKEN_FILE", TOKEN_FILE, NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"AZURE_CLIENT_ID", NULL}},
    {.name = "AZURE_CLIENT_ID not a GUID",
     .env = {"AZURE_CLIENT_ID", "my-app", "AZURE_TENANT_ID", TENANT, "AZURE_FEDERATED_TOKEN_FILE",
             TOKEN_FILE, NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"AZURE_CLIENT_ID", "my-app"}},
    {.name = "--client-id not a GUID",
     .env = {ENV_ALL, NULL},
     .argv = {"--client-id", "12345", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--client-id", "12345"}},
    {.name = "AZURE_TENANT_ID missing",
     .env = {"AZURE_CLIENT_ID", CID, "AZURE_FEDERATED_TOKEN_FILE", TOKEN_FILE, NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"AZURE_TENANT_ID", NULL}},
    {.name = "AZURE_TENANT_ID invalid",
     .env = {"AZURE_CLIENT_ID", CID, "AZURE_TENANT_ID", "contoso/evil",
             "AZURE_FEDERATED_TOKEN_FILE", TOKEN_FILE, NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"AZURE_TENANT_ID", "contoso/evil"}},
    {.name = "AZURE_FEDERATED_TOKEN_FILE missing",
     .env = {ENV_ID, NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"AZURE_FEDERATED_TOKEN_FILE", NULL}},
    {.name = "AZURE_AUTHORITY_HOST http://",
     .env = {ENV_BASE, "AZURE_AUTHORITY_HOST", "http://login.microsoftonline.com/", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"AZURE_AUTHORITY_HOST", "http://login.microsoftonline.com/"}},
    {.name = "AZURE_AUTHORITY_HOST without scheme",
     .env = {ENV_BASE, "AZURE_AUTHORITY_HOST", "login.microsoftonline.com", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"AZURE_AUTHORITY_HOST", "login.microsoftonline.com"}},
    {.name = "--authority-host bad port",
     .env = {ENV_ALL, NULL},
     .argv = {"--authority-host", "https://login.microsoftonline.com:99999", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--authority-host", "https://login.microsoftonline.com:99999"}},
    {.name = "--authority-host empty host",
     .env = {ENV_ALL, NULL},
     .argv = {"--authority-host", "https://:443", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--authority-host", "https://:443"}},
    {.name = "IMDSD_LOG_LEVEL invalid",
     .env = {ENV_ALL, "IMDSD_LOG_LEVEL", "loud", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"IMDSD_LOG_LEVEL", "loud"}},
    {.name = "--log-level invalid",
     .env = {ENV_ALL, NULL},
     .argv = {"--log-level", "verbose", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--log-level", "verbose"}},
    {.name = "--listen nonsense",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "nonsense", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--listen", "nonsense"}},
    {.name = "--listen 127.0.0.1:99999",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "127.0.0.1:99999", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--listen", "127.0.0.1:99999"}},
    {.name = "--listen 127.0.0.1:",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "127.0.0.1:", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--listen", "127.0.0.1:"}},
    {.name = "--listen :80",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", ":80", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--listen", ":80"}},
    {.name = "--listen localhost:80",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "localhost:80", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--listen", "localhost:80"}},
    {.name = "--listen 9 times",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "127.0.0.1:1", "--listen", "127.0.0.1:2", "--listen", "127.0.0.1:3",
              "--listen", "127.0.0.1:4", "--listen", "127.0.0.1:5", "--listen", "127.0.0.1:6",
              "--listen", "127.0.0.1:7", "--listen", "127.0.0.1:8", "--listen", "127.0.0.1:9",
              NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--listen", NULL}},
    {.name = "--max-connections 0",
     .env = {ENV_ALL, NULL},
     .argv = {"--max-connections", "0", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--max-connections", "'0'"}},
    {.name = "--max-connections 65537",
     .env = {ENV_ALL, NULL},
     .argv = {"--max-connections", "65537", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--max-connections", "65537"}},
    {.name = "--max-health-connections 0",
     .env = {ENV_ALL, NULL},
     .argv = {"--max-health-connections", "0", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--max-health-connections", "'0'"}},
    {.name = "--max-health-connections 65537",
     .env = {ENV_ALL, NULL},
     .argv = {"--max-health-connections", "65537", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--max-health-connections", "65537"}},
    {.name = "--max-connections 10x",
     .env = {ENV_ALL, NULL},
     .argv = {"--max-connections", "10x", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--max-connections", "10x"}},
    {.name = "--idle-timeout 0",
     .env = {ENV_ALL, NULL},
     .argv = {"--idle-timeout", "0", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--idle-timeout", "'0'"}},
    {.name = "--idle-timeout 3601",
     .env = {ENV_ALL, NULL},
     .argv = {"--idle-timeout", "3601", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--idle-timeout", "3601"}},
    {.name = "--entra-timeout 301",
     .env = {ENV_ALL, NULL},
     .argv = {"--entra-timeout", "301", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--entra-timeout", "301"}},
    {.name = "--entra-timeout -1",
     .env = {ENV_ALL, NULL},
     .argv = {"--entra-timeout", "-1", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--entra-timeout", "-1"}},
    {.name = "--allow-client-id not a GUID",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-client-id", "someone", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--allow-client-id", "someone"}},
    {.name = "--health-listen on the token address",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "127.0.0.1:8000", "--health-listen", "127.0.0.1:8000", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--health-listen", "127.0.0.1:8000"}},
    {.name = "--health-listen not an address",
     .env = {ENV_ALL, NULL},
     .argv = {"--health-listen", "8001", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--health-listen", "'8001'"}},
    {.name = "--add-loopback-address: the init mode needs no identity",
     .env = {NULL},
     .argv = {"--add-loopback-address", "169.254.169.254", NULL},
     .rc = CONFIG_OK,
     .add_address = "169.254.169.254"},
    {.name = "--add-loopback-address with a prefix length",
     .env = {NULL},
     .argv = {"--add-loopback-address", "169.254.169.254/32", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--add-loopback-address", "'169.254.169.254/32'"}},
    {.name = "--add-loopback-address IPv6",
     .env = {NULL},
     .argv = {"--add-loopback-address", "fd00::254", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--add-loopback-address", "'fd00::254'"}},
    {.name = "--add-loopback-address short form",
     .env = {NULL},
     .argv = {"--add-loopback-address", "169.254.43518", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--add-loopback-address", "is not an IPv4 address"}},
    {.name = "--probe: readyz by default, no identity needed",
     .env = {NULL},
     .argv = {"--probe", "127.0.0.1:8001", NULL},
     .rc = CONFIG_OK,
     .probe = "127.0.0.1 8001 /readyz"},
    {.name = "--probe alone: this imdsd's own /readyz, until ready",
     .env = {NULL},
     .argv = {"--probe", NULL},
     .rc = CONFIG_OK,
     .probe = "127.0.0.1 8000 /readyz",
     .probe_wait = 1},
    {.name = "the webhook's postStart hook: --proxy-port=N --probe --log-level=L",
     .env = {ENV_ALL, NULL},
     .argv = {"--proxy-port=9000", "--probe", "--log-level=info", NULL},
     .rc = CONFIG_OK,
     .probe = "127.0.0.1 9000 /readyz",
     .probe_wait = 1},
    {.name = "--probe alone: the first address that serves tokens",
     .env = {NULL},
     .argv = {"--health-listen", "0.0.0.0:8001", "--listen", "[::1]:8100", "--probe", NULL},
     .rc = CONFIG_OK,
     .probe = "::1 8100 /readyz",
     .probe_wait = 1},
    {.name = "--probe=ADDR in one word",
     .env = {NULL},
     .argv = {"--probe=127.0.0.1:8001/healthz", NULL},
     .rc = CONFIG_OK,
     .probe = "127.0.0.1 8001 /healthz"},
    {.name = "--probe ADDR after other flags",
     .env = {NULL},
     .argv = {"--log-level", "debug", "--probe", "127.0.0.1:8001", NULL},
     .rc = CONFIG_OK,
     .probe = "127.0.0.1 8001 /readyz"},
    {.name = "--probe with a path and IPv6",
     .env = {NULL},
     .argv = {"--probe", "[::1]:8000/healthz", NULL},
     .rc = CONFIG_OK,
     .probe = "::1 8000 /healthz"},
    {.name = "the webhook's proxy sidecar args: --proxy-port=N --log-level=L",
     .env = {ENV_ALL, NULL},
     .argv = {"--proxy-port=8000", "--log-level=info", NULL},
     .rc = CONFIG_OK,
     .log_level = LVL(LOG_INFO),
     .nlisten = 1,
     .l0_host = "127.0.0.1",
     .l0_port = 8000},
    {.name = "--proxy-port beside --listen",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "127.0.0.1:8000", "--proxy-port", "9000", NULL},
     .rc = CONFIG_OK,
     .nlisten = 2,
     .l0_host = "127.0.0.1",
     .l0_port = 8000,
     .l1_host = "127.0.0.1",
     .l1_port = 9000},
    {.name = "--proxy-port 0",
     .env = {ENV_ALL, NULL},
     .argv = {"--proxy-port", "0", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--proxy-port", "invalid value '0' (1 to 65535)"}},
    {.name = "--proxy-port the same as --listen",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", "127.0.0.1:8000", "--proxy-port=8000", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"127.0.0.1:8000 is given twice", NULL}},
    {.name = "the proxy sidecar's flags, and one it never had",
     .env = {ENV_ALL, NULL},
     .argv = {"--proxy-port=8000", "--log-level=info", "--metadata-endpoint=x", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--metadata-endpoint=x: unknown option", NULL}},
    {.name = "--log-level empty: the proxy's unset, info",
     .env = {ENV_ALL, NULL},
     .argv = {"--log-level=", NULL},
     .rc = CONFIG_OK,
     .log_level = LVL(LOG_INFO)},
    {.name = "--log-level warning (the proxy's)",
     .env = {ENV_ALL, NULL},
     .argv = {"--log-level=warning", NULL},
     .rc = CONFIG_OK,
     .log_level = LVL(LOG_WARN)},
    {.name = "--log-level trace (the proxy's)",
     .env = {ENV_ALL, NULL},
     .argv = {"--log-level=trace", NULL},
     .rc = CONFIG_OK,
     .log_level = LVL(LOG_DEBUG)},
    {.name = "--log-level all (the proxy's)",
     .env = {ENV_ALL, NULL},
     .argv = {"--log-level", "all", NULL},
     .rc = CONFIG_OK,
     .log_level = LVL(LOG_DEBUG)},
    {.name = "--probe without a port",
     .env = {NULL},
     .argv = {"--probe", "127.0.0.1/readyz", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--probe", "'127.0.0.1/readyz'"}},
    {.name = "--probe with a space in the path",
     .env = {NULL},
     .argv = {"--probe", "127.0.0.1:8000/readyz HTTP/1.0", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--probe", "'127.0.0.1:8000/readyz HTTP/1.0'"}},
    {.name = "--probe with a host name",
     .env = {NULL},
     .argv = {"--probe", "localhost:8000", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--probe", "want IP:PORT"}},
    {.name = "--allow-resource: two wildcards",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-resource", "https://*.*.azure.net", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--allow-resource", "'https://*.*.azure.net'"}},
    {.name = "--allow-resource: a wildcard in the path",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-resource", "https://vault.azure.net/*", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--allow-resource", "in the host name"}},
    {.name = "--allow-resource: patterns accepted",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-resource", "https://*.vault.azure.net", "--allow-resource",
              "https://management.azure.com/", NULL},
     .rc = CONFIG_OK},
    {.name = "--header-timeout 0",
     .env = {ENV_ALL, NULL},
     .argv = {"--header-timeout", "0", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--header-timeout", "'0'"}},
    {.name = "--allow-host with a port",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-host", "imdsd:8000", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--allow-host", "imdsd:8000"}},
    {.name = "--allow-host with an empty label",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-host", "a..b", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--allow-host", "a..b"}},
    {.name = "unknown option",
     .env = {ENV_ALL, NULL},
     .argv = {"--bogus", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--bogus", NULL}},
    {.name = "missing option value",
     .env = {ENV_ALL, NULL},
     .argv = {"--listen", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--listen", NULL}},
    {.name = "unknown short option inside a cluster: named, not the argument before it",
     .env = {ENV_ALL, NULL},
     .argv = {"--tenant-id", TENANT, "-xy", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"-x: unknown option", NULL},
     .err_out = TENANT},
    {.name = "control characters in a value: err stays one line",
     .env = {ENV_ALL, NULL},
     .argv = {"--client-id", "my\napp\x1b[31m\r", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--client-id", "'my?app?[31m?' is not a GUID"}},
    {.name = "--token-file empty",
     .env = {ENV_ALL, NULL},
     .argv = {"--token-file", "", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--token-file: empty path", NULL}},
    {.name = "--ca-file empty",
     .env = {ENV_ALL, "IMDSD_CA_FILE", "/etc/ca.pem", NULL},
     .argv = {"--ca-file=", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--ca-file: empty path", NULL}},
    {.name = "--identity-header-file empty",
     .env = {ENV_ALL, NULL},
     .argv = {"--identity-header-file", "", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--identity-header-file: empty path", NULL}},
    {.name = "unexpected positional argument",
     .env = {ENV_ALL, NULL},
     .argv = {"surprise", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"surprise", NULL}},
    {.name = "error after allocations (leak check)",
     .env = {ENV_ALL, "IMDSD_CA_FILE", "/x", NULL},
     .argv = {"--allow-client-id", CID2, "--client-id", CID3, "--listen", "bad", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--listen", "bad"}},
    {.name = "--header-timeout, --shutdown-grace, --identity-header-overlap at their bounds",
     .env = {ENV_ALL, NULL},
     .argv = {"--header-timeout", "3600", "--shutdown-grace", "0", "--identity-header-overlap",
              "86400", NULL},
     .rc = CONFIG_OK,
     .header_timeout = 3600,
     .grace = VAL(0),
     .overlap = VAL(86400)},
    {.name = "--shutdown-grace 60, --identity-header-overlap 0",
     .env = {ENV_ALL, NULL},
     .argv = {"--shutdown-grace", "60", "--identity-header-overlap", "0", NULL},
     .rc = CONFIG_OK,
     .grace = VAL(60),
     .overlap = VAL(0)},
    {.name = "--header-timeout 3601",
     .env = {ENV_ALL, NULL},
     .argv = {"--header-timeout", "3601", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--header-timeout", "'3601'"}},
    {.name = "--shutdown-grace 61",
     .env = {ENV_ALL, NULL},
     .argv = {"--shutdown-grace", "61", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--shutdown-grace", "'61'"}},
    {.name = "--identity-header-overlap 86401",
     .env = {ENV_ALL, NULL},
     .argv = {"--identity-header-overlap", "86401", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--identity-header-overlap", "'86401'"}},
    {.name = "--identity-header-overlap 1h",
     .env = {ENV_ALL, NULL},
     .argv = {"--identity-header-overlap", "1h", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--identity-header-overlap", "'1h'"}},
    {.name = "--log-format json",
     .env = {ENV_ALL, NULL},
     .argv = {"--log-format", "json", NULL},
     .rc = CONFIG_OK,
     .log_format = VAL(LOG_FORMAT_JSON)},
    {.name = "IMDSD_LOG_FORMAT from env",
     .env = {ENV_ALL, "IMDSD_LOG_FORMAT", "JSON", NULL},
     .rc = CONFIG_OK,
     .log_format = VAL(LOG_FORMAT_JSON)},
    {.name = "valid --log-format overrides a bad IMDSD_LOG_FORMAT",
     .env = {ENV_ALL, "IMDSD_LOG_FORMAT", "xml", NULL},
     .argv = {"--log-format", "logfmt", NULL},
     .rc = CONFIG_OK,
     .log_format = VAL(LOG_FORMAT_LOGFMT)},
    {.name = "--log-format invalid",
     .env = {ENV_ALL, NULL},
     .argv = {"--log-format", "xml", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--log-format", "'xml'"}},
    {.name = "IMDSD_LOG_FORMAT invalid",
     .env = {ENV_ALL, "IMDSD_LOG_FORMAT", "syslog", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"IMDSD_LOG_FORMAT", "'syslog'"}},
    {.name = "--arc-key-dir and a numeric --arc-key-group",
     .env = {ENV_ALL, NULL},
     .argv = {"--arc-key-dir", "/var/opt/azcmagent/tokens", "--arc-key-group", "1234", NULL},
     .rc = CONFIG_OK,
     .arc_key_dir = "/var/opt/azcmagent/tokens",
     .arc_gid = VAL(1234)},
    {.name = "--arc-key-group by name",
     .env = {ENV_ALL, NULL},
     .argv = {"--arc-key-group", "root", NULL},
     .rc = CONFIG_OK,
     .arc_gid = VAL(0)},
    {.name = "--arc-key-group unknown",
     .env = {ENV_ALL, NULL},
     .argv = {"--arc-key-group", "no-such-group-imdsd", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--arc-key-group", "'no-such-group-imdsd'"}},
    {.name = "--arc-key-dir relative",
     .env = {ENV_ALL, NULL},
     .argv = {"--arc-key-dir", "tokens", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--arc-key-dir", "'tokens'"}},
    {.name = "--arc-key-dir of 201 bytes",
     .env = {ENV_ALL, NULL},
     .argv = {"--arc-key-dir", "/" X50 X50 X50 X50, NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--arc-key-dir", "at most 200 bytes"}},
    {.name = "--arc-key-dir of 200 bytes",
     .env = {ENV_ALL, NULL},
     .argv = {"--arc-key-dir", "/" X50 X50 X50 X10 X10 X10 X10 "xxxxxxxxx", NULL},
     .rc = CONFIG_OK,
     .arc_key_dir = "/" X50 X50 X50 X10 X10 X10 X10 "xxxxxxxxx"},
    {.name = "--identity-alias: an object id and a resource id",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-client-id", CID2, "--identity-alias", CID3 "=" CID, "--identity-alias",
              RID "=" CID2, NULL},
     .rc = CONFIG_OK,
     .naliases = 2,
     .alias_key = RID,
     .alias_client = CID2},
    {.name = "--identity-alias: the client id in capitals",
     .env = {ENV_ALL, NULL},
     .argv = {"--identity-alias", CID3 "=0A1B2C3D-0000-4000-8000-00000000000A", NULL},
     .rc = CONFIG_OK,
     .naliases = 1,
     .alias_key = CID3},
    {.name = "--identity-alias without '='",
     .env = {ENV_ALL, NULL},
     .argv = {"--identity-alias", CID3, NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--identity-alias", "not ID=CLIENT_ID"}},
    {.name = "--identity-alias: client id not a GUID",
     .env = {ENV_ALL, NULL},
     .argv = {"--identity-alias", CID3 "=my-app", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--identity-alias", "'" CID3 "=my-app'"}},
    {.name = "--identity-alias: key neither a GUID nor a resource id",
     .env = {ENV_ALL, NULL},
     .argv = {"--identity-alias", "my-app=" CID, NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--identity-alias", "'my-app' is neither"}},
    {.name = "--identity-alias: a client id it does not serve",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-client-id", CID2, "--identity-alias", RID "=" CID3, NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--identity-alias", "'" CID3 "' is neither --client-id"}},
    {.name = "--identity-header-file is only noted",
     .env = {ENV_ALL, NULL},
     .argv = {"--identity-header-file", "/nonexistent/secret", NULL},
     .rc = CONFIG_OK,
     .ih_file = "/nonexistent/secret"},
    {.name = "--allow-resource twice",
     .env = {ENV_ALL, NULL},
     .argv = {"--allow-resource", "https://vault.azure.net", "--allow-resource",
              "https://storage.azure.com/", NULL},
     .rc = CONFIG_OK,
     .nresources = 2},
    {.name = "HTTPS_PROXY",
     .env = {ENV_ALL, "HTTPS_PROXY", "http://proxy.example:3128", NULL},
     .rc = CONFIG_OK,
     .proxy = 2,
     .proxy_desc = "http://proxy.example:3128"},
    {.name = "HTTPS_PROXY wins over https_proxy",
     .env = {ENV_ALL, "https_proxy", "http://lower.example:1", "HTTPS_PROXY",
             "http://upper.example:2", NULL},
     .rc = CONFIG_OK,
     .proxy = 2,
     .proxy_desc = "http://upper.example:2"},
    {.name = "empty HTTPS_PROXY: https_proxy",
     .env = {ENV_ALL, "HTTPS_PROXY", "", "https_proxy", "lower.example:8080", NULL},
     .rc = CONFIG_OK,
     .proxy = 2,
     .proxy_desc = "http://lower.example:8080"},
    {.name = "NO_PROXY exempts the authority",
     .env = {ENV_ALL, "HTTPS_PROXY", "http://proxy.example:3128", "NO_PROXY",
             "localhost,.microsoftonline.com", NULL},
     .rc = CONFIG_OK,
     .proxy = 1},
    {.name = "empty NO_PROXY: no_proxy exempts the authority",
     .env = {ENV_ALL, "HTTPS_PROXY", "http://proxy.example:3128", "NO_PROXY", "", "no_proxy",
             "login.microsoftonline.com:443", NULL},
     .rc = CONFIG_OK,
     .proxy = 1},
    {.name = "NO_PROXY for other hosts",
     .env = {ENV_ALL, "HTTPS_PROXY", "http://proxy.example:3128", "NO_PROXY",
             "localhost,login.microsoftonline.com:8443", NULL},
     .rc = CONFIG_OK,
     .proxy = 2,
     .proxy_desc = "http://proxy.example:3128"},
    {.name = "no HTTPS_PROXY: NO_PROXY alone changes nothing",
     .env = {ENV_ALL, "NO_PROXY", "*", NULL},
     .rc = CONFIG_OK,
     .proxy = 1},
    {.name = "HTTPS_PROXY invalid: named, password not shown",
     .env = {ENV_ALL, "HTTPS_PROXY", "https://user:hunter2@proxy.example:3128", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"HTTPS_PROXY", "user:***@proxy.example"},
     .err_out = "hunter2"},
    {.name = "https_proxy invalid: named",
     .env = {ENV_ALL, "https_proxy", "socks5://proxy.example:1080", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"https_proxy", "'socks5://proxy.example:1080'"}},
    {.name = "--tenant-id empty",
     .env = {ENV_ALL, NULL},
     .argv = {"--tenant-id", "", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--tenant-id", "''"}},
    {.name = "--tenant-id a domain of 253 bytes",
     .env = {ENV_ALL, NULL},
     .argv = {"--tenant-id", X250 ".io", NULL},
     .rc = CONFIG_OK,
     .tenant_id = X250 ".io"},
    {.name = "--tenant-id a domain of 254 bytes",
     .env = {ENV_ALL, NULL},
     .argv = {"--tenant-id", X250 ".com", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--tenant-id", "is not a GUID or domain name"}},
    {.name = "--probe address too long",
     .env = {NULL},
     .argv = {"--probe", "[" X50 X10 X10 "]:80", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--probe", "want IP:PORT"}},
    {.name = "--probe path of 64 bytes",
     .env = {NULL},
     .argv = {"--probe", "127.0.0.1:8000/" X50 X10 "xxx", NULL},
     .rc = CONFIG_ERROR,
     .err_in = {"--probe", "want IP:PORT"}},
    {.name = "--probe path of 63 bytes",
     .env = {NULL},
     .argv = {"--probe", "127.0.0.1:8000/" X50 X10 "xx", NULL},
     .rc = CONFIG_OK,
     .probe = "127.0.0.1 8000 /" X50 X10 "xx"},
};

static int argv_len(const char *const *a)
{
    int n = 0;
    while (a[n])
        n++;
    return n;
}

static void t_cfg(void **state)
{
    const struct cfg_row *r = *state;
    char *argv[26];
    int argc = 0;
    argv[argc++] = (char *)"imdsd";
    for (int i = 0; i < argv_len(r->argv); i++)
        argv[argc++] = (char *)r->argv[i];
    argv[argc] = NULL;
    fake_env = r->env;
    struct config *cp = tconfig();
    char err[512] = ""; /* as main.c's */
    int rc = config_parse(cp, argc, argv, fake_getenv, err, sizeof err);
    const struct config c = *cp;
    if (rc != r->rc)
        print_error("config_parse -> %d, err '%s'\n", rc, err);
    assert_int_equal(rc, r->rc);
    assert_string_equal(c.add_address, r->add_address ? r->add_address : "");
    assert_int_equal(c.probe, rc == CONFIG_OK && r->probe ? 1 + r->probe_wait : 0);
    if (rc == CONFIG_OK && r->probe) {
        char got[160];
        snprintf(got, sizeof got, "%s %d %s", c.probe_at.host, c.probe_at.port, c.probe_path);
        assert_string_equal(got, r->probe);
        if (!r->env[0])
            assert_null(c.client_id);
    } else if (rc == CONFIG_OK && r->add_address) {
        assert_null(c.client_id); /* nothing else is needed, nor read */
    } else if (rc == CONFIG_OK) {
        assert_non_null(c.client_id);
        assert_non_null(c.tenant_id);
        assert_non_null(c.token_file);
        assert_non_null(c.authority);
        assert_non_null(c.authority_host);
        assert_non_null(c.authority_path);
        assert_non_null(c.ca_file);
        assert_true(c.nlisten >= 1);
        if (r->client_id)
            assert_string_equal(c.client_id, r->client_id);
        if (r->tenant_id)
            assert_string_equal(c.tenant_id, r->tenant_id);
        if (r->token_file)
            assert_string_equal(c.token_file, r->token_file);
        if (r->authority)
            assert_string_equal(c.authority, r->authority);
        if (r->host)
            assert_string_equal(c.authority_host, r->host);
        if (r->port)
            assert_string_equal(c.authority_port, r->port);
        if (r->path)
            assert_string_equal(c.authority_path, r->path);
        if (r->ca_file)
            assert_string_equal(c.ca_file, r->ca_file);
        if (r->log_level)
            assert_int_equal(c.log_level, r->log_level - 1);
        if (r->nlisten) {
            assert_int_equal(c.nlisten, r->nlisten);
            for (int i = 0; i < c.nlisten; i++)
                assert_int_equal(c.listen[i].health, (r->health >> i) & 1);
        }
        if (r->l0_host) {
            assert_string_equal(c.listen[0].host, r->l0_host);
            assert_int_equal(c.listen[0].port, r->l0_port);
        }
        if (r->l1_host) {
            assert_string_equal(c.listen[1].host, r->l1_host);
            assert_int_equal(c.listen[1].port, r->l1_port);
        }
        if (r->nallowed)
            assert_int_equal(c.nallowed, r->nallowed);
        if (r->allowed0)
            assert_string_equal(c.allowed_client_ids[0], r->allowed0);
        if (r->nhosts)
            assert_int_equal(c.nallowed_hosts, r->nhosts);
        if (r->host1)
            assert_string_equal(c.allowed_hosts[1], r->host1);
        if (r->max_conn)
            assert_int_equal(c.max_connections, r->max_conn);
        if (r->max_health_conn)
            assert_int_equal(c.max_health_connections, r->max_health_conn);
        if (r->idle)
            assert_int_equal(c.idle_timeout_s, r->idle);
        if (r->entra_timeout)
            assert_int_equal(c.entra_timeout_s, r->entra_timeout);
        if (r->header_timeout)
            assert_int_equal(c.header_timeout_s, r->header_timeout);
        if (r->grace)
            assert_int_equal(c.shutdown_grace_s, r->grace - 1);
        if (r->overlap)
            assert_int_equal(c.identity_header_overlap_s, r->overlap - 1);
        if (r->log_format)
            assert_int_equal(c.log_format, r->log_format - 1);
        if (r->arc_key_dir)
            assert_string_equal(c.arc_key_dir, r->arc_key_dir);
        if (r->arc_gid)
            assert_int_equal(c.arc_gid, r->arc_gid - 1);
        if (r->naliases) {
            assert_int_equal(c.naliases, r->naliases);
            assert_string_equal(c.aliases[c.naliases - 1].key, r->alias_key);
            if (r->alias_client)
                assert_string_equal(c.aliases[c.naliases - 1].client_id, r->alias_client);
        }
        if (r->ih_file) {
            assert_string_equal(c.identity_header_file, r->ih_file);
            assert_null(c.identity_header); /* config_load_identity_header reads it */
        }
        if (r->nresources)
            assert_int_equal(c.nallowed_resources, r->nresources);
        if (r->proxy) {
            assert_int_equal(c.use_proxy, r->proxy == 2);
            assert_string_equal(proxy_describe(&c.proxy), r->proxy == 2 ? r->proxy_desc : "");
        }
        if (r->defaults) {
            assert_string_equal(c.ca_file, CONFIG_DEFAULT_CA_FILE);
            assert_int_equal(c.log_level, LOG_INFO);
            assert_int_equal(c.nlisten, 1);
            assert_string_equal(c.listen[0].host, "127.0.0.1");
            assert_int_equal(c.listen[0].port, 8000);
            assert_int_equal(c.nallowed, 0);
            assert_int_equal(c.nallowed_hosts, 0);
            assert_int_equal(c.max_connections, 1024);
            assert_int_equal(c.max_health_connections, 64);
            assert_int_equal(c.idle_timeout_s, 60);
            assert_int_equal(c.entra_timeout_s, 15);
            assert_int_equal(c.header_timeout_s, 10);
            assert_int_equal(c.shutdown_grace_s, 5);
            assert_int_equal(c.identity_header_overlap_s, 300);
            assert_int_equal(c.log_format, LOG_FORMAT_LOGFMT);
            assert_null(c.arc_key_dir);
            assert_int_equal(c.arc_gid, -1);
            assert_int_equal(c.naliases, 0);
            assert_int_equal(c.nallowed_resources, 0);
            assert_null(c.identity_header_file);
            assert_int_equal(c.use_proxy, 0);
        }
    } else if (rc == CONFIG_ERROR) {
        assert_true(err[0] != 0);
        assert_null(strchr(err, '\n')); /* one line */
        for (int i = 0; i < 2; i++)
            if (r->err_in[i] && !strstr(err, r->err_in[i])) {
                print_error("err '%s' lacks '%s'\n", err, r->err_in[i]);
                fail();
            }
        if (r->err_out && strstr(err, r->err_out)) {
            print_error("err '%s' holds '%s'\n", err, r->err_out);
            fail();
        }
    }
    config_free(cp);
    assert_null(cp->client_id);
    assert_null(cp->authority);
    assert_int_equal(cp->nallowed, 0);
}

/* config_parse again after a refused "-xy": nothing of the first argv is left in getopt. */
static void t_reparse(void **state)
{
    (void)state;
    static const char *const env[] = {ENV_ALL, NULL};
    char *argv1[] = {(char *)"imdsd", (char *)"-xy", NULL};
    char *argv2[] = {(char *)"imdsd", (char *)"--log-level", (char *)"debug", NULL};
    char err[512] = "";
    fake_env = env;
    assert_int_equal(config_parse(tconfig(), 2, argv1, fake_getenv, err, sizeof err), CONFIG_ERROR);
    err[0] = 0;
    if (config_parse(tconfig(), 3, argv2, fake_getenv, err, sizeof err) != CONFIG_OK)
        fail_msg("second config_parse: %s", err);
}

/* --help / --version: CONFIG_EXIT, output on stdout. */
struct exit_row {
    const char *name;
    const char *arg;
    const char *out_in;
};

static const struct exit_row exit_rows[] = {
    {"--help", "--help", "--listen"},
    {"--version", "--version", IMDSD_VERSION},
};

static void t_exit(void **state)
{
    const struct exit_row *r = *state;
    char *argv[] = {(char *)"imdsd", (char *)r->arg, NULL};
    static const char *const no_env[] = {NULL}; /* works without any environment */
    fake_env = no_env;
    FILE *tmp = tmpfile();
    assert_non_null(tmp);
    defer(file_release, tmp);
    fflush(stdout);
    int saved = dup(STDOUT_FILENO);
    assert_true(saved >= 0);
    assert_true(dup2(fileno(tmp), STDOUT_FILENO) >= 0);
    char err[256] = "";
    int rc = config_parse(tconfig(), 2, argv, fake_getenv, err, sizeof err);
    fflush(stdout);
    dup2(saved, STDOUT_FILENO);
    close(saved);
    assert_int_equal(rc, CONFIG_EXIT);
    char out[4096];
    rewind(tmp);
    size_t n = fread(out, 1, sizeof out - 1, tmp);
    out[n] = 0;
    assert_true(n > 0);
    assert_non_null(strstr(out, r->out_in));
}

/* ---- config_parse_listen --------------------------------------------------------------------- */

struct listen_row {
    const char *name;
    const char *in;
    int rc;
    const char *host;
    int port;
};

static const struct listen_row listen_rows[] = {
    {"127.0.0.1:8000", "127.0.0.1:8000", 0, "127.0.0.1", 8000},
    {"[::1]:8000", "[::1]:8000", 0, "::1", 8000},
    {"169.254.169.254:80", "169.254.169.254:80", 0, "169.254.169.254", 80},
    {"port 1", "127.0.0.1:1", 0, "127.0.0.1", 1},
    {"port 65535", "127.0.0.1:65535", 0, "127.0.0.1", 65535},
    {"[fe80::1]:8000", "[fe80::1]:8000", 0, "fe80::1", 8000},
    {"nonsense", "nonsense", -1, NULL, 0},
    {"127.0.0.1:99999", "127.0.0.1:99999", -1, NULL, 0},
    {"127.0.0.1:65536", "127.0.0.1:65536", -1, NULL, 0},
    {"127.0.0.1:0", "127.0.0.1:0", -1, NULL, 0},
    {"127.0.0.1:", "127.0.0.1:", -1, NULL, 0},
    {":80", ":80", -1, NULL, 0},
    {"localhost:80", "localhost:80", -1, NULL, 0},
    {"no port", "127.0.0.1", -1, NULL, 0},
    {"port with sign", "127.0.0.1:+80", -1, NULL, 0},
    {"port with space", "127.0.0.1: 80", -1, NULL, 0},
    {"port with letters", "127.0.0.1:80a", -1, NULL, 0},
    {"bad IPv4", "127.0.0.256:80", -1, NULL, 0},
    {"[::1] without port", "[::1]", -1, NULL, 0},
    {"[::1]: empty port", "[::1]:", -1, NULL, 0},
    {"[::1]8000 missing colon", "[::1]8000", -1, NULL, 0},
    {"unterminated bracket", "[::1:8000", -1, NULL, 0},
    {"empty brackets", "[]:8000", -1, NULL, 0},
    {"bad IPv6", "[::g]:8000", -1, NULL, 0},
    {"unbracketed ::1 without port", "::1", -1, NULL, 0},
    {"empty", "", -1, NULL, 0},
    {"host too long", "[0000:0000:0000:0000:0000:0000:0000:0000:0000:0000:0000:0000:0000:0000]:80",
     -1, NULL, 0},
};

static void t_listen(void **state)
{
    const struct listen_row *r = *state;
    struct config_listen l;
    memset(&l, 0, sizeof l);
    int rc = config_parse_listen(tstrdup(r->in), &l);
    if (rc != r->rc)
        print_error("'%s' -> %d (host '%s' port %d)\n", r->in, rc, l.host, l.port);
    assert_int_equal(rc, r->rc);
    if (rc == 0) {
        assert_string_equal(l.host, r->host);
        assert_int_equal(l.port, r->port);
    }
}

/* ---- config_set_authority -------------------------------------------------------------------- */

struct auth_row {
    const char *name;
    const char *url;
    int rc;
    const char *authority, *host, *port, *path;
    const char *why_in;
};

static const struct auth_row auth_rows[] = {
    {"public cloud with slash", PUBLIC, 0, "https://login.microsoftonline.com",
     "login.microsoftonline.com", "443", "", NULL},
    {"no trailing slash", "https://login.microsoftonline.com", 0,
     "https://login.microsoftonline.com", "login.microsoftonline.com", "443", "", NULL},
    {"several trailing slashes", "https://login.microsoftonline.com///", 0,
     "https://login.microsoftonline.com", "login.microsoftonline.com", "443", "", NULL},
    {"surrounding whitespace", "  https://login.microsoftonline.com/ \n", 0,
     "https://login.microsoftonline.com", "login.microsoftonline.com", "443", "", NULL},
    {"host:port with slash", "https://host:8443/", 0, "https://host:8443", "host", "8443", "",
     NULL},
    {"IPv4 and port", "https://127.0.0.1:8443", 0, "https://127.0.0.1:8443", "127.0.0.1", "8443",
     "", NULL},
    {"IPv6 and port", "https://[::1]:8443", 0, "https://[::1]:8443", "::1", "8443", "", NULL},
    {"IPv6 without port", "https://[::1]/", 0, "https://[::1]", "::1", "443", "", NULL},
    {"path prefix kept", "https://127.0.0.1:8443/prefix/", 0, "https://127.0.0.1:8443/prefix",
     "127.0.0.1", "8443", "/prefix", NULL},
    {"deeper path prefix", "https://login.example.com/a/b", 0, "https://login.example.com/a/b",
     "login.example.com", "443", "/a/b", NULL},
    {"http:// rejected", "http://login.microsoftonline.com/", -1, NULL, NULL, NULL, NULL, "https"},
    {"no scheme rejected", "login.microsoftonline.com", -1, NULL, NULL, NULL, NULL, "https"},
    {"ftp:// rejected", "ftp://login.microsoftonline.com", -1, NULL, NULL, NULL, NULL, "https"},
    {"empty rejected", "", -1, NULL, NULL, NULL, NULL, NULL},
    {"port 0", "https://host:0", -1, NULL, NULL, NULL, NULL, "port"},
    {"port 99999", "https://host:99999", -1, NULL, NULL, NULL, NULL, "port"},
    {"port 123456", "https://host:123456/", -1, NULL, NULL, NULL, NULL, "port"},
    {"port letters", "https://host:https", -1, NULL, NULL, NULL, NULL, "port"},
    {"empty port", "https://host:/", -1, NULL, NULL, NULL, NULL, "port"},
    {"IPv6 port letters", "https://[::1]:x", -1, NULL, NULL, NULL, NULL, "port"},
    {"empty host with port", "https://:8443", -1, NULL, NULL, NULL, NULL, "host"},
    {"empty host with path", "https:///path", -1, NULL, NULL, NULL, NULL, "host"},
    {"empty IPv6 host", "https://[]:8443", -1, NULL, NULL, NULL, NULL, "host"},
    {"unterminated IPv6", "https://[::1:8443", -1, NULL, NULL, NULL, NULL, NULL},
    {"junk after IPv6", "https://[::1]x", -1, NULL, NULL, NULL, NULL, "host"},
    {"not an IPv6 address in brackets", "https://[xxxx::1:22]", -1, NULL, NULL, NULL, NULL, "host"},
    {"a name in brackets", "https://[login.example.com]:443", -1, NULL, NULL, NULL, NULL, "host"},
    {"IPv4 in brackets", "https://[127.0.0.1]", -1, NULL, NULL, NULL, NULL, "host"},
    {"IPv4-mapped IPv6", "https://[::ffff:127.0.0.1]:8443", 0, "https://[::ffff:127.0.0.1]:8443",
     "::ffff:127.0.0.1", "8443", "", NULL},
    {"userinfo", "https://user@host", -1, NULL, NULL, NULL, NULL, "user name"},
    {"space in host", "https://ho st", -1, NULL, NULL, NULL, NULL, "host"},
    {"query in path", "https://host/p?x=1", -1, NULL, NULL, NULL, NULL, NULL},
    {"host of 253 bytes (the longest DNS name)", "https://" X250 ".co/", 0, "https://" X250 ".co",
     X250 ".co", "443", "", NULL},
    {"host of 254 bytes (found by fuzz_config)", "https://" X250 "x.co/", -1, NULL, NULL, NULL,
     NULL, "host"},
    {"host of 256 bytes", "https://" X250 "xx.com/", -1, NULL, NULL, NULL, NULL, "host"},
    {"IPv6 host of 256 bytes", "https://[" X250 "::1:22]:443", -1, NULL, NULL, NULL, NULL, "host"},
    {"fragment in path", "https://host/p#f", -1, NULL, NULL, NULL, NULL, NULL},
    /* Keep these last: a read past the end aborts the ASan build here. */
    {"scheme only https://", "https://", -1, NULL, NULL, NULL, NULL, "host"},
    {"scheme and slashes https:////", "https:////", -1, NULL, NULL, NULL, NULL, "host"},
};

static void t_auth(void **state)
{
    const struct auth_row *r = *state;
    struct config *c = tconfig();
    const char *why = NULL;
    int rc = config_set_authority(c, tstrdup(r->url), &why);
    if (rc != r->rc)
        print_error("'%s' -> %d (authority '%s', why '%s')\n", r->url, rc,
                    c->authority ? c->authority : "", why ? why : "");
    assert_int_equal(rc, r->rc);
    if (rc == 0) {
        assert_string_equal(c->authority, r->authority);
        assert_string_equal(c->authority_host, r->host);
        assert_string_equal(c->authority_port, r->port);
        assert_string_equal(c->authority_path, r->path);
    } else {
        assert_non_null(why);
        if (r->why_in && !strstr(why, r->why_in)) {
            print_error("why '%s' lacks '%s'\n", why, r->why_in);
            fail();
        }
        assert_null(c->authority);
    }
}

/* AZURE_KUBERNETES_TOKEN_PROXY and friends, through config_parse as main.c calls it. */
struct tproxy_row {
    const char *name;
    const char *const env[16];
    const char *expect; /* "host port path sni": what the proxy settings became; NULL: an error */
    const char *err_in[2];
};

#define TP "AZURE_KUBERNETES_TOKEN_PROXY"

static const struct tproxy_row tproxy_rows[] = {
    {"none set: straight to the authority", {ENV_ALL, NULL}, "- - - -", {NULL}},
    {"empty is not set",
     {ENV_ALL, TP, "", "AZURE_KUBERNETES_SNI_NAME", "", NULL},
     "- - - -",
     {NULL}},
    {"host only: the path is /",
     {ENV_ALL, TP, "https://10.0.0.1", NULL},
     "10.0.0.1 443 - -",
     {NULL}},
    {"port, path and SNI",
     {ENV_ALL, TP, "https://kubernetes.default.svc:8443/bind/ns1/", "AZURE_KUBERNETES_SNI_NAME",
      "tokenproxy.aks.test", NULL},
     "kubernetes.default.svc 8443 /bind/ns1 tokenproxy.aks.test",
     {NULL}},
    {"the path is cleaned as url.JoinPath does",
     {ENV_ALL, TP, "https://p//a/./b/../c//", NULL},
     "p 443 /a/c -",
     {NULL}},
    {"'..' cannot climb above the root",
     {ENV_ALL, TP, "https://p/../../x", NULL},
     "p 443 /x -",
     {NULL}},
    {"IPv6 literal", {ENV_ALL, TP, "https://[fd00::1]:9443/x", NULL}, "fd00::1 9443 /x -", {NULL}},
    {"http is refused",
     {ENV_ALL, TP, "http://bad", NULL},
     NULL,
     {TP, "'http://bad' must be an https:// URL"}},
    {"user info", {ENV_ALL, TP, "https://a:b@p", NULL}, NULL, {TP, "user name or password"}},
    {"query", {ENV_ALL, TP, "https://p/x?y=1", NULL}, NULL, {TP, "query"}},
    {"fragment", {ENV_ALL, TP, "https://p/x#y", NULL}, NULL, {TP, "fragment"}},
    {"SNI without a proxy",
     {ENV_ALL, "AZURE_KUBERNETES_SNI_NAME", "x.test", NULL},
     NULL,
     {"AZURE_KUBERNETES_SNI_NAME", "AZURE_KUBERNETES_TOKEN_PROXY is not"}},
    {"CA file and data",
     {ENV_ALL, TP, "https://p", "AZURE_KUBERNETES_CA_FILE", "/ca.crt", "AZURE_KUBERNETES_CA_DATA",
      "-----BEGIN CERTIFICATE-----", NULL},
     NULL,
     {"'/ca.crt') and AZURE_KUBERNETES_CA_DATA (27 bytes) are both set", NULL}},
};

static void t_tproxy(void **state)
{
    const struct tproxy_row *r = *state;
    char *argv[] = {(char *)"imdsd", NULL};
    fake_env = r->env;
    struct config *c = tconfig();
    char err[512] = "", got[600];
    int rc = config_parse(c, 1, argv, fake_getenv, err, sizeof err);
    if (rc == CONFIG_OK)
        snprintf(got, sizeof got, "%s %s %s %s", c->token_proxy.host ? c->token_proxy.host : "-",
                 c->token_proxy.url ? c->token_proxy.port : "-",
                 c->token_proxy.path && *c->token_proxy.path ? c->token_proxy.path : "-",
                 c->sni_name ? c->sni_name : "-");
    else
        snprintf(got, sizeof got, "error: %s", err);
    if (r->expect) {
        assert_int_equal(rc, CONFIG_OK);
        assert_string_equal(got, r->expect);
        return;
    }
    assert_int_equal(rc, CONFIG_ERROR);
    for (int i = 0; i < 2 && r->err_in[i]; i++)
        if (!strstr(err, r->err_in[i])) {
            print_error("'%s' lacks '%s'\n", err, r->err_in[i]);
            fail();
        }
}

static void t_auth_twice(void **state)
{
    (void)state;
    struct config *c = tconfig();
    const char *why = NULL;
    assert_int_equal(config_set_authority(c, "https://a.example:1/x", &why), 0);
    assert_int_equal(config_set_authority(c, "https://b.example", &why), 0); /* no leak */
    assert_string_equal(c->authority, "https://b.example");
    assert_string_equal(c->authority_port, "443");
    assert_string_equal(c->authority_path, "");
    assert_int_equal(config_set_authority(c, "http://c.example", &why), -1);
    assert_string_equal(c->authority, "https://b.example"); /* unchanged on error */
}

/* ---- the lists' limits: N times is fine, N + 1 is refused naming N ------------------------ */

struct limit_row {
    const char *name;
    const char *flag;
    const char *pre, *post; /* the i-th value: pre, i and post; pre alone when post is NULL */
    int max;
    size_t count; /* offsetof the int in struct config that counts them */
    int extra;    /* entries the config adds (the default --listen) */
    const char *err_in;
};

static const struct limit_row limit_rows[] = {
    {"--allow-client-id", "--allow-client-id", CID2, NULL, CONFIG_MAX_CLIENT_IDS,
     offsetof(struct config, nallowed), 0, "--allow-client-id: at most 32 identities"},
    {"--identity-alias", "--identity-alias", "/subscriptions/", "=" CID, CONFIG_MAX_ALIASES,
     offsetof(struct config, naliases), 0, "--identity-alias: at most 64 aliases"},
    {"--allow-resource", "--allow-resource", "https://r", ".example", CONFIG_MAX_RESOURCES,
     offsetof(struct config, nallowed_resources), 0, "--allow-resource: at most 32 resources"},
    {"--allow-host", "--allow-host", "h", ".example", CONFIG_MAX_HOSTS,
     offsetof(struct config, nallowed_hosts), 0, "--allow-host: at most 16 names"},
    {"--health-listen with the default --listen", "--health-listen", "127.0.0.1:", "",
     CONFIG_MAX_LISTEN - 1, offsetof(struct config, nlisten), 1,
     "--health-listen: at most 7 addresses with the default --listen"},
};

static void t_limit(void **state)
{
    const struct limit_row *r = *state;
    static char vals[2 * 70][80];
    static const char *const env[] = {ENV_ALL, NULL};
    fake_env = env;
    for (int n = r->max; n <= r->max + 1; n++) {
        char *argv[2 * 70 + 2];
        int argc = 0;
        argv[argc++] = (char *)"imdsd";
        for (int i = 0; i < n; i++) {
            if (r->post)
                snprintf(vals[i], sizeof vals[i], "%s%d%s", r->pre, 9000 + i, r->post);
            else
                snprintf(vals[i], sizeof vals[i], "%s", r->pre);
            argv[argc++] = (char *)r->flag;
            argv[argc++] = vals[i];
        }
        argv[argc] = NULL;
        struct config *c = tconfig();
        char err[512] = "";
        int rc = config_parse(c, argc, argv, fake_getenv, err, sizeof err);
        if (n == r->max) {
            if (rc != CONFIG_OK)
                print_error("%d times: %s\n", n, err);
            assert_int_equal(rc, CONFIG_OK);
            int count;
            memcpy(&count, (const char *)c + r->count, sizeof count);
            assert_int_equal(count, n + r->extra);
        } else {
            assert_int_equal(rc, CONFIG_ERROR);
            if (!strstr(err, r->err_in)) {
                print_error("err '%s' lacks '%s'\n", err, r->err_in);
                fail();
            }
        }
    }
}

/* ---- config_check_secret: the X-IDENTITY-HEADER secret as read from its file ------------- */

struct secret_row {
    const char *name;
    const char *in;
    size_t n; /* 0: strlen(in) */
    size_t len, start;
    const char *why_in; /* NULL: accepted */
};

#define S255 X250 "sssss"
#define B10  "          "
#define B50  B10 B10 B10 B10 B10
#define B250 B50 B50 B50 B50 B50

static const struct secret_row secret_rows[] = {
    {"plain", "s3cret", 0, 6, 0, NULL},
    {"trailing newline", "s3cret\n", 0, 6, 0, NULL},
    {"surrounding blanks", " \t s3cret \r\n", 0, 6, 3, NULL},
    {"inner space kept", "s3 cret", 0, 7, 0, NULL},
    {"printable ASCII", "!~\"'\\", 0, 5, 0, NULL},
    {"255 bytes", S255 "\n", 0, 255, 0, NULL},
    {"256 bytes", S255 "s", 0, 0, 0, "more than 255 bytes"},
    {"255 bytes and CRLF: one byte less than read", S255 "\r\n", 0, 255, 0, NULL},
    {"as much as is read: too long, blanks or not", "s3cret" B250 "\n\n", 0, 0, 0,
     "more than 255 bytes"},
    {"255 bytes after a blank: the blank counts", " " S255, 0, 0, 0, "more than 255 bytes"},
    {"empty", "", 0, 0, 0, "is empty"},
    {"whitespace only", " \n\t\r\n", 0, 0, 0, "is empty"},
    {"control character",
     "s3\x01"
     "cret",
     0, 0, 0, "cannot be sent in an HTTP header"},
    {"NUL inside", "s3\0cret", 7, 0, 0, "cannot be sent in an HTTP header"},
    {"DEL", "s3cret\x7f", 0, 0, 0, "cannot be sent in an HTTP header"},
    {"UTF-8", "caf\xc3\xa9", 0, 0, 0, "cannot be sent in an HTTP header"},
};

static void t_secret(void **state)
{
    const struct secret_row *r = *state;
    size_t n = r->n ? r->n : strlen(r->in);
    size_t start = 99;
    const char *why = "unset";
    size_t len = config_check_secret(tcopy(r->in, n), n, &start, &why);
    if (!r->why_in) {
        if (why)
            print_error("refused: %s\n", why);
        assert_null(why);
        assert_int_equal(len, r->len);
        assert_int_equal(start, r->start);
    } else {
        assert_int_equal(len, 0);
        assert_non_null(why);
        if (!strstr(why, r->why_in)) {
            print_error("why '%s' lacks '%s'\n", why, r->why_in);
            fail();
        }
    }
}

/* ---- config_load_identity_header: the file read at start-up ---------------------------------- */

struct ihf_row {
    const char *name;
    const char *content; /* NULL: no such file; "/": a directory; "|": a FIFO */
    const char *secret;  /* NULL: refused */
    const char *err_in;
};

static const struct ihf_row ihf_rows[] = {
    {"secret with a newline", "s3cret-value\n", "s3cret-value", NULL},
    {"255 bytes", S255, S255, NULL},
    {"longer than 255 bytes", S255 S255, NULL, "holds more than 255 bytes"},
    {"255 bytes and CRLF", S255 "\r\n", S255, NULL},
    {"a secret, blanks, then more: never cut", "s3cret" B250 "\ntail", NULL,
     "holds more than 255 bytes"},
    {"empty file", "", NULL, "is empty"},
    {"control character", "s3cret\x1b[0m", NULL, "cannot be sent in an HTTP header"},
    {"no such file", NULL, NULL, "cannot read"},
    {"a directory", "/", NULL, "is not a regular file"},
    /* a FIFO no one writes to: opening it for reading would block the start-up for good */
    {"a FIFO", "|", NULL, "is not a regular file"},
};

static void path_release(void *p)
{
    unlink(p);
    rmdir(p);
    free(p);
}

static void t_ihf(void **state)
{
    const struct ihf_row *r = *state;
    char *path = strdup("/tmp/imdsd-test-config-XXXXXX");
    assert_non_null(path);
    if (r->content && strcmp(r->content, "/") == 0) {
        assert_non_null(mkdtemp(path));
    } else if (r->content && strcmp(r->content, "|") == 0) {
        int fd = mkstemp(path);
        assert_true(fd >= 0);
        close(fd);
        unlink(path);
        assert_int_equal(mkfifo(path, 0600), 0);
    } else {
        int fd = mkstemp(path);
        assert_true(fd >= 0);
        size_t n = r->content ? strlen(r->content) : 0;
        assert_int_equal(write(fd, r->content ? r->content : "", n), (ssize_t)n);
        close(fd);
        if (!r->content)
            unlink(path);
    }
    defer(path_release, path);
    struct config *c = tconfig();
    c->identity_header_file = strdup(path);
    char err[512] = "";
    int rc = config_load_identity_header(c, err, sizeof err);
    if (r->secret) {
        if (rc != 0)
            print_error("%s\n", err);
        assert_int_equal(rc, 0);
        assert_int_equal(c->identity_header_len, strlen(r->secret));
        assert_memory_equal(c->identity_header, r->secret, strlen(r->secret));
    } else {
        assert_int_equal(rc, -1);
        assert_null(c->identity_header);
        assert_non_null(strstr(err, "--identity-header-file"));
        assert_non_null(strstr(err, path));
        if (!strstr(err, r->err_in)) {
            print_error("err '%s' lacks '%s'\n", err, r->err_in);
            fail();
        }
        if (r->content && strlen(r->content) > 1 && strcmp(r->content, "|") != 0)
            assert_null(strstr(err, r->content)); /* the secret is never shown */
    }
}

int main(void)
{
    ADD_ROWS("config_parse_listen", listen_rows, t_listen);
    ADD_ROWS("config_parse", cfg_rows, t_cfg);
    ADD_ROWS("config_parse exit", exit_rows, t_exit);
    add("config_parse", "again after a refused \"-xy\"", t_reparse, NULL);
    add("config_set_authority", "twice on one config", t_auth_twice, NULL);
    ADD_ROWS("config_set_authority", auth_rows, t_auth);
    ADD_ROWS("config_parse AKS token proxy", tproxy_rows, t_tproxy);
    ADD_ROWS("config_parse limits", limit_rows, t_limit);
    ADD_ROWS("config_check_secret", secret_rows, t_secret);
    ADD_ROWS("config_load_identity_header", ihf_rows, t_ihf);
    return _cmocka_run_group_tests("config", tests, ntests, NULL, NULL);
}
