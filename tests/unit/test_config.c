/* test_config.c - config_parse (fake getenv + argv), config_parse_listen, config_set_authority.
 * config_free() runs after every case, including the error ones, so valgrind sees no leak. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    unsigned max_conn, idle, entra_timeout;
    int defaults;            /* check every default value */
    const char *add_address; /* the one-shot init mode: only this is set */
    const char *probe;       /* the exec probe: "HOST PORT PATH" */
    /* CONFIG_ERROR: substrings of err */
    const char *err_in[2];
};

#define LVL(l) ((l) + 1)

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
     .argv = {"--max-connections", "10", "--idle-timeout", "5", "--entra-timeout", "300", NULL},
     .rc = CONFIG_OK,
     .max_conn = 10,
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
    {.name = "--probe with a path and IPv6",
     .env = {NULL},
     .argv = {"--probe", "[::1]:8000/healthz", NULL},
     .rc = CONFIG_OK,
     .probe = "::1 8000 /healthz"},
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
    char err[256] = "";
    int rc = config_parse(cp, argc, argv, fake_getenv, err, sizeof err);
    const struct config c = *cp;
    if (rc != r->rc)
        print_error("config_parse -> %d, err '%s'\n", rc, err);
    assert_int_equal(rc, r->rc);
    assert_string_equal(c.add_address, r->add_address ? r->add_address : "");
    assert_int_equal(c.probe, rc == CONFIG_OK && r->probe != NULL);
    if (rc == CONFIG_OK && r->probe) {
        char got[160];
        snprintf(got, sizeof got, "%s %d %s", c.probe_at.host, c.probe_at.port, c.probe_path);
        assert_string_equal(got, r->probe);
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
        if (r->idle)
            assert_int_equal(c.idle_timeout_s, r->idle);
        if (r->entra_timeout)
            assert_int_equal(c.entra_timeout_s, r->entra_timeout);
        if (r->defaults) {
            assert_string_equal(c.ca_file, CONFIG_DEFAULT_CA_FILE);
            assert_int_equal(c.log_level, LOG_INFO);
            assert_int_equal(c.nlisten, 1);
            assert_string_equal(c.listen[0].host, "127.0.0.1");
            assert_int_equal(c.listen[0].port, 8000);
            assert_int_equal(c.nallowed, 0);
            assert_int_equal(c.nallowed_hosts, 0);
            assert_int_equal(c.max_connections, 1024);
            assert_int_equal(c.idle_timeout_s, 60);
            assert_int_equal(c.entra_timeout_s, 15);
        }
    } else if (rc == CONFIG_ERROR) {
        assert_true(err[0] != 0);
        assert_null(strchr(err, '\n')); /* one line */
        for (int i = 0; i < 2; i++)
            if (r->err_in[i] && !strstr(err, r->err_in[i])) {
                print_error("err '%s' lacks '%s'\n", err, r->err_in[i]);
                fail();
            }
    }
    config_free(cp);
    assert_null(cp->client_id);
    assert_null(cp->authority);
    assert_int_equal(cp->nallowed, 0);
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
    {"userinfo", "https://user@host", -1, NULL, NULL, NULL, NULL, "host"},
    {"space in host", "https://ho st", -1, NULL, NULL, NULL, NULL, "host"},
    {"query in path", "https://host/p?x=1", -1, NULL, NULL, NULL, NULL, NULL},
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

int main(void)
{
    ADD_ROWS("config_parse_listen", listen_rows, t_listen);
    ADD_ROWS("config_parse", cfg_rows, t_cfg);
    ADD_ROWS("config_parse exit", exit_rows, t_exit);
    add("config_set_authority", "twice on one config", t_auth_twice, NULL);
    ADD_ROWS("config_set_authority", auth_rows, t_auth);
    return _cmocka_run_group_tests("config", tests, ntests, NULL, NULL);
}
