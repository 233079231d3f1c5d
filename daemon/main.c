/* imdsd - serves Entra ID access tokens for a Kubernetes workload identity on a local
 * IMDS-compatible endpoint. main: configuration, start-up in dependency order, the loop, and
 * teardown in reverse order. */
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <uv.h>

#include "config.h"
#include "endpoints.h"
#include "entra.h"
#include "http_server.h"
#include "log.h"
#include "metrics.h"
#include "netaddr.h"
#include "probe.h"
#include "sd.h"
#include "token_cache.h"
#include "token_file.h"
#include "util.h"

struct daemon {
    uv_loop_t loop;
    struct config cfg;
    struct entra *entra;
    struct token_file *tf;
    struct token_cache *cache;
    struct http_server *server;
    struct endpoints ep;
    uv_signal_t sigterm, sigint, sighup;
    int stopping;
};

static const char *env(const char *name)
{
    return getenv(name);
}

/* Frees what start() made, in the reverse order; what was not made is NULL (or zero). */
static void free_modules(struct daemon *d)
{
    http_server_free(d->server);
    d->server = NULL;
    endpoints_free(&d->ep);
    token_cache_free(d->cache);
    d->cache = NULL;
    token_file_free(d->tf);
    d->tf = NULL;
    entra_free(d->entra);
    d->entra = NULL;
}

/* Frees everything but the loop; called when the server has drained (or at once on a second
 * signal). */
static void teardown(void *arg)
{
    struct daemon *d = arg;
    free_modules(d);
    sd_close();
    uv_close((uv_handle_t *)&d->sigterm, NULL);
    uv_close((uv_handle_t *)&d->sigint, NULL);
    uv_close((uv_handle_t *)&d->sighup, NULL);
}

static void stop(struct daemon *d, const char *why)
{
    if (d->stopping) {
        log_info("stopping_now", "signal=%s", why);
        if (d->server)
            teardown(d);
        return;
    }
    d->stopping = 1;
    sd_stopping();
    log_info("stopping", "signal=%s grace_s=%u", why, d->cfg.shutdown_grace_s);
    http_server_shutdown(d->server, d->cfg.shutdown_grace_s * 1000u, teardown, d);
}

static void on_signal(uv_signal_t *s, int signum)
{
    struct daemon *d = s->data;
    if (signum == SIGHUP) {
        sd_reloading();
        token_file_reload(d->tf);
        endpoints_reload(&d->ep);
        sd_reloaded();
    } else
        stop(d, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

/* Each client connection takes a descriptor: raise the soft limit (1024 by default, also under
 * systemd) so that --max-connections, not the descriptor limit, is what caps them. */
static void raise_fd_limit(unsigned max_connections)
{
    rlim_t want = (rlim_t)max_connections + 64; /* the loop, Entra connections, files, spare */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= want)
        return;
    rlim_t cur = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want ? rl.rlim_max : want;
    if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
        cur = rl.rlim_cur;
    if (cur < want)
        log_warn("fd_limit_low", "max_connections=%u nofile=%llu needed=%llu", max_connections,
                 (unsigned long long)cur, (unsigned long long)want);
}

/* What imdsd waits for, as systemd's STATUS= line (sd_status_cb; arg is the daemon); ready when
 * every --prefetch token is in hand (READY=1 waits for them). */
static int status_text(char *out, size_t n, void *arg)
{
    const struct daemon *d = arg;
    struct token_file_status st;
    char why[400];
    int total = 0,
        missing = d->cache ? token_cache_prefetch_missing(d->cache, &total, why, sizeof why) : 0;
    token_file_status(d->tf, now_epoch(), &st);
    if (st.state == TOKEN_UNKNOWN)
        snprintf(out, n, "reading the service-account token (%s)", d->cfg.token_file);
    else if (st.state != TOKEN_OK)
        snprintf(out, n, "waiting for the service-account token: %s (%s)",
                 token_state_name(st.state), d->cfg.token_file);
    else if (missing)
        snprintf(out, n, "waiting for %d of %d prefetched tokens: %s", missing, total, why);
    else if (metrics.entra_failures_in_row > 0)
        snprintf(out, n, "waiting for Entra: %" PRIu64 " failed exchanges in a row (last: %s)",
                 metrics.entra_failures_in_row,
                 (unsigned)metrics.entra_last_failure < OUT_COUNT
                     ? metrics_outcome_names[metrics.entra_last_failure]
                     : "?");
    else
        snprintf(out, n, "serving tokens");
    return missing == 0;
}

/* The local address of a listening socket, as "ip:port" or "[ip]:port". */
static const char *sock_str(int fd, char out[CONFIG_LISTEN_STR])
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET6) {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
            uv_ip6_name(a, ip, sizeof ip);
            port = ntohs(a->sin6_port);
        } else if (ss.ss_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)&ss;
            uv_ip4_name(a, ip, sizeof ip);
            port = ntohs(a->sin_port);
        }
    }
    return hostport_str(out, CONFIG_LISTEN_STR, ip, port);
}

/* Serves on the sockets systemd passed instead of --listen and --health-listen: a socket whose
 * name (FileDescriptorName=) starts with "health" becomes a health listener, any other a token
 * listener. Returns how many (0: none was passed, --listen applies), or -1 with a one-line reason
 * naming LISTEN_FDS. */
static int listen_passed(struct daemon *d, char *err, size_t errlen)
{
    const struct sd_socket *socks;
    int n = sd_listen(&socks), tokens = 0;
    for (int i = 0; i < n; i++) {
        int fd = socks[i].fd, health = strncmp(socks[i].name, "health", 6) == 0;
        const char *raw = socks[i].name;
        char name[80], addr[CONFIG_LISTEN_STR];
        log_quote(name, sizeof name, raw, strlen(raw));
        int rc = http_server_listen_fd(d->server, fd, health ? LISTENER_HEALTH : LISTENER_TOKENS);
        if (rc < 0) {
            const char *why = rc == -ENOTSOCK     ? "is not a socket"
                              : rc == -EPROTOTYPE ? "is not a TCP (stream, IPv4 or IPv6) socket"
                              : rc == -EINVAL     ? "is not listening"
                                                  : strerror(-rc);
            snprintf(err, errlen, "LISTEN_FDS: descriptor %d%s%s%s %s", fd, *raw ? " (" : "",
                     *raw ? name : "", *raw ? ")" : "", why);
            return -1;
        }
        tokens += !health;
        log_info("listening", "addr=%s serves=%s from=systemd fd=%d name=%s", sock_str(fd, addr),
                 health ? "health" : "tokens", fd, name);
    }
    if (n && !tokens)
        log_warn("no_token_listener", "reason=\"systemd passed health sockets only\"");
    return n;
}

static int start(struct daemon *d)
{
    char err[512];
    const struct config *c = &d->cfg;
    raise_fd_limit(c->max_connections + c->max_health_connections);
    metrics.start_time_s = now_wall_ms() / 1000;
    if (entra_new(&d->entra, &d->loop, c, err, sizeof err) < 0) {
        log_fatal("%s", err);
        return 2;
    }
    d->tf = token_file_new(&d->loop, c->token_file);
    struct token_cache_opts co = {.entra_timeout_s = c->entra_timeout_s};
    d->cache = token_cache_new(&d->loop, &co, d->entra, d->tf);
    if (endpoints_init(&d->ep, &d->loop, c, d->cache, d->tf, err, sizeof err) < 0) {
        log_fatal("%s", err);
        return 2;
    }
    struct http_server_opts so = {.idle_timeout_ms = c->idle_timeout_s * 1000u,
                                  .header_timeout_ms = c->header_timeout_s * 1000u,
                                  .error_body = endpoints_error_body};
    so.max_connections[LISTENER_TOKENS] = c->max_connections;
    so.max_connections[LISTENER_HEALTH] = c->max_health_connections;
    d->server = http_server_new(&d->loop, &so, endpoints_handle, &d->ep);
    int passed = listen_passed(d, err, sizeof err); /* systemd's sockets replace --listen */
    if (passed < 0) {
        log_fatal("%s", err);
        return 2;
    }
    for (int i = 0; passed == 0 && i < c->nlisten; i++) {
        const struct config_listen *l = &c->listen[i];
        char addr[CONFIG_LISTEN_STR];
        config_listen_str(l, addr);
        int rc = http_server_listen(d->server, l->host, l->port,
                                    l->health ? LISTENER_HEALTH : LISTENER_TOKENS);
        if (rc < 0) {
            log_fatal("%s: cannot listen on %s: %s", l->health ? "--health-listen" : "--listen",
                      addr, uv_strerror(rc));
            return 1;
        }
        log_info("listening", "addr=%s serves=%s", addr, l->health ? "health" : "tokens");
    }
    uv_signal_init(&d->loop, &d->sigterm);
    uv_signal_init(&d->loop, &d->sigint);
    uv_signal_init(&d->loop, &d->sighup);
    d->sigterm.data = d->sigint.data = d->sighup.data = d;
    uv_signal_start(&d->sigterm, on_signal, SIGTERM);
    uv_signal_start(&d->sigint, on_signal, SIGINT);
    uv_signal_start(&d->sighup, on_signal, SIGHUP);
    char qtoken[512], qca[512]; /* paths are logged quoted, like any value from outside */
    log_info("started",
             "version=%s client_id=%s tenant_id=%s authority=%s token_file=%s "
             "ca_file=%s allowed_client_ids=%d aliases=%d app_service=%s proxy=%s",
             IMDSD_VERSION, c->client_id, c->tenant_id, c->authority,
             log_quote(qtoken, sizeof qtoken, c->token_file, strlen(c->token_file)),
             log_quote(qca, sizeof qca, c->ca_file, strlen(c->ca_file)), c->nallowed, c->naliases,
             c->identity_header ? "on" : "off", c->use_proxy ? proxy_describe(&c->proxy) : "none");
    if (c->token_proxy.url) { /* an AKS identity binding */
        char qfile[512];
        log_info("token_proxy", "url=%s sni_name=%s ca=%s", c->token_proxy.url,
                 c->sni_name ? c->sni_name : c->token_proxy.host,
                 c->k8s_ca_file
                     ? log_quote(qfile, sizeof qfile, c->k8s_ca_file, strlen(c->k8s_ca_file))
                 : c->k8s_ca_data ? "AZURE_KUBERNETES_CA_DATA"
                                  : "ca_file");
    }
    for (int i = 0; i < c->nprefetch; i++)
        token_cache_prefetch(d->cache, c->prefetch[i].client_id, c->prefetch[i].resource);
    return 0;
}

int main(int argc, char **argv)
{
    static struct daemon d;
    char err[512];
    int rc = config_parse(&d.cfg, argc, argv, env, err, sizeof err);
    if (rc != CONFIG_OK) {
        if (rc == CONFIG_ERROR)
            fprintf(stderr, "imdsd: %s\n", err);
        config_free(&d.cfg);
        return rc == CONFIG_EXIT ? 0 : 2;
    }
    log_min_level = d.cfg.log_level;
    log_format = d.cfg.log_format;
    if (d.cfg.identity_header_file && config_load_identity_header(&d.cfg, err, sizeof err) < 0) {
        log_fatal("%s", err);
        config_free(&d.cfg);
        return 2;
    }
    if (d.cfg.add_address[0]) {
        rc = netaddr_add_loopback(d.cfg.add_address, err, sizeof err);
        if (rc == NETADDR_ERROR)
            fprintf(stderr, "imdsd: --add-loopback-address: %s\n", err);
        else
            log_info("loopback_address", "addr=%s/32 dev=lo result=%s", d.cfg.add_address,
                     rc == NETADDR_ADDED ? "added" : "already_present");
        config_free(&d.cfg);
        return rc == NETADDR_ERROR ? 1 : 0;
    }
    if (d.cfg.probe) {
        rc = (d.cfg.probe == 2 ? probe_wait : probe_run)(&d.cfg.probe_at, d.cfg.probe_path, err,
                                                         sizeof err);
        if (rc != 200 && d.cfg.probe == 2)
            fprintf(stderr, "imdsd: --probe: %s (retried for %d s)\n", err, PROBE_WAIT_MS / 1000);
        else if (rc != 200)
            fprintf(stderr, "imdsd: --probe: %s\n", err);
        config_free(&d.cfg);
        return rc == 200 ? 0 : 1;
    }
    if (sd_init(err, sizeof err) < 0) { /* before any thread: it edits the environment */
        fprintf(stderr, "imdsd: %s\n", err);
        config_free(&d.cfg);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    uv_loop_init(&d.loop);
    rc = start(&d);
    if (rc != 0) {
        /* release what was set up, then let the closes finish */
        d.stopping = 1;
        free_modules(&d);
        uv_run(&d.loop, UV_RUN_DEFAULT);
        uv_loop_close(&d.loop);
        config_free(&d.cfg);
        return rc;
    }
    sd_ready(&d.loop, status_text, &d); /* every listener is open */
    uv_run(&d.loop, UV_RUN_DEFAULT);
    int closed = uv_loop_close(&d.loop);
    config_free(&d.cfg);
    log_info("stopped", "clean=%s", closed == 0 ? "yes" : "no");
    return closed == 0 ? 0 : 1;
}
