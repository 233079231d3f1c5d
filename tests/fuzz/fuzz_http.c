/* libFuzzer: the whole request path as wired. The input's bytes go down a real socket into the
 * real http_server (llhttp callbacks, caps, keep-alive, pipelining), the real endpoints (routing,
 * IMDS, App Service, health) and the real token cache; only Entra, the token file and the
 * identity-header file are stand-ins, answering from the loop. What comes back must be a clean
 * sequence of complete HTTP/1.1 responses, each with a Content-Length, a JSON body where it says
 * JSON, and no access token or identity secret in any answer but a 200 for a token.
 *
 * Input: byte 0 picks the listener, whether the App Service secret is on, how Entra and the token
 * file answer; byte 1 how the rest is cut into writes (0: one write); the rest is the client's. */
#include <errno.h>
#include <llhttp.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "endpoints.h"
#include "entra.h"
#include "json.h"
#include "log.h"
#include "secret_watch.h"
#include "token_cache.h"
#include "token_file.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ACCESS_TOKEN "eyJ0eXAiOiJKV1QifQ.FUZZ-ACCESS-TOKEN.c2ln"
#define SECRET       "fuzz-identity-secret-0123456789"

static unsigned flags;
static uv_loop_t loop;

/* ---- stand-ins: Entra, the token file, the identity-header file ---------------------------- */

/* A stand-in answers from the loop on its next turn, like the real ones, and a cancel drops the
 * answer: the timer is closed, so it never touches a request its owner has freed. */
static void free_handle(uv_handle_t *h)
{
    free(h);
}

static void later(uv_timer_cb cb, void *req)
{
    uv_timer_t *t = malloc(sizeof *t);
    uv_timer_init(&loop, t);
    t->data = req;
    uv_timer_start(t, cb, 0, 0);
}

static void drop_if_for(uv_handle_t *h, void *req)
{
    if (h->type == UV_TIMER && h->data == req && !uv_is_closing(h))
        uv_close(h, free_handle);
}

static void cancel_later(void *req)
{
    uv_walk(&loop, drop_if_for, req);
}

static void on_entra_timer(uv_timer_t *t)
{
    struct entra_fetch *f = t->data;
    uv_close((uv_handle_t *)t, free_handle);
    struct entra_result r;
    if (flags & 0x10) {
        static const char body[] =
            "{\"error\":\"invalid_client\",\"error_description\":\"AADSTS700016:"
            " Application not found\",\"error_codes\":[700016]}";
        entra_parse_response(&r, 400, body, sizeof body - 1, NULL);
    } else {
        static const char body[] =
            "{\"token_type\":\"Bearer\",\"expires_in\":3599,\"access_token\":\"" ACCESS_TOKEN "\"}";
        entra_parse_response(&r, 200, body, sizeof body - 1, NULL);
    }
    f->sent_mono_ms = (int64_t)now_ms();
    f->sent_wall_ms = now_wall_ms();
    f->done(f, &r);
    entra_result_free(&r);
}

int entra_fetch(struct entra *e, struct entra_fetch *f, const char *client_id, const char *resource,
                const char *assertion, size_t assertion_len)
{
    (void)e, (void)assertion, (void)assertion_len;
    f->client_id = client_id;
    f->resource = resource;
    later(on_entra_timer, f);
    return 0;
}

void entra_cancel(struct entra_fetch *f)
{
    cancel_later(f);
}

static void status_of(struct token_file_status *st)
{
    memset(st, 0, sizeof *st);
    st->state = (flags & 0x20) ? TOKEN_EXPIRED : TOKEN_OK;
    strcpy(st->reason, (flags & 0x20) ? "expired" : "ok");
    st->len = 7;
    strcpy(st->fp, "0123456789ab");
}

void token_file_status(struct token_file *tf, int64_t now, struct token_file_status *out)
{
    (void)tf, (void)now;
    status_of(out);
}

static void on_file_timer(uv_timer_t *t)
{
    struct token_file_waiter *w = t->data;
    uv_close((uv_handle_t *)t, free_handle);
    struct token_file_status st;
    status_of(&st);
    w->cb(w->arg, &st, st.state == TOKEN_OK ? "a.b.c.d" : NULL, st.state == TOKEN_OK ? 7 : 0);
}

void token_file_get(struct token_file *tf, struct token_file_waiter *w)
{
    w->tf = tf;
    later(on_file_timer, w);
}

void token_file_cancel(struct token_file_waiter *w)
{
    cancel_later(w);
}

int secret_watch_get(const struct secret_watch *sw, struct imds_secret out[2])
{
    (void)sw;
    out[0].value = SECRET;
    out[0].len = sizeof SECRET - 1;
    return 1;
}

/* endpoints_init makes no secret watch here (cfg.identity_header is set after it), and the
 * endpoints are never reloaded nor freed: none of these may run */
struct secret_watch *secret_watch_new(uv_loop_t *loop, const char *path, const char *secret,
                                      size_t len, unsigned overlap_s)
{
    (void)loop, (void)path, (void)secret, (void)len, (void)overlap_s;
    __builtin_trap();
}

void secret_watch_reload(struct secret_watch *sw)
{
    (void)sw;
    __builtin_trap();
}

void secret_watch_free(struct secret_watch *sw)
{
    (void)sw;
    __builtin_trap();
}

const char *token_state_name(enum token_state s)
{
    return s == TOKEN_OK ? "ok" : "expired";
}

/* the Azure Arc challenge is off (ep.arc is NULL): none of these may run */
uid_t arc_peer_uid(struct arc *a, int fd)
{
    (void)a, (void)fd;
    __builtin_trap();
}

struct arc_challenge *arc_challenge(struct arc *a, uid_t uid, arc_done_cb *done, void *arg,
                                    int *refused)
{
    (void)a, (void)uid, (void)done, (void)arg, (void)refused;
    __builtin_trap();
}

void arc_cancel(struct arc_challenge *ch)
{
    (void)ch;
    __builtin_trap();
}

int arc_verify(struct arc *a, const char *auth, size_t len)
{
    (void)a, (void)auth, (void)len;
    __builtin_trap();
}

struct arc *arc_new(uv_loop_t *loop, const char *dir, gid_t gid, char *err, size_t errlen)
{
    (void)loop, (void)dir, (void)gid, (void)err, (void)errlen;
    __builtin_trap();
}

void arc_free(struct arc *a)
{
    (void)a;
    __builtin_trap();
}

/* ---- the answers' checks ------------------------------------------------------------------- */

struct check {
    llhttp_t p;
    int in_message, has_length, field_ct, field_cl, nresp;
    char field[32];
    size_t field_len;
    char ctype[64];
    size_t ctype_len;
    char body[16384];
    size_t body_len;
};

static int on_field(llhttp_t *p, const char *at, size_t len)
{
    struct check *k = p->data;
    size_t n = len < sizeof k->field - 1 - k->field_len ? len : sizeof k->field - 1 - k->field_len;
    memcpy(k->field + k->field_len, at, n);
    k->field_len += n;
    return 0;
}

static int on_field_done(llhttp_t *p)
{
    struct check *k = p->data;
    k->field[k->field_len] = 0;
    k->field_ct = strcasecmp(k->field, "Content-Type") == 0;
    k->field_cl = strcasecmp(k->field, "Content-Length") == 0;
    k->has_length |= k->field_cl;
    k->field_len = 0;
    return 0;
}

static int on_value(llhttp_t *p, const char *at, size_t len)
{
    struct check *k = p->data;
    if (k->field_ct && k->ctype_len + len < sizeof k->ctype) {
        memcpy(k->ctype + k->ctype_len, at, len);
        k->ctype_len += len;
    }
    return 0;
}

static int on_status_text(llhttp_t *p, const char *at, size_t len)
{
    (void)p;
    if (len == 7 && memcmp(at, "Unknown", 7) == 0)
        __builtin_trap(); /* a status without its reason phrase */
    return 0;
}

static int on_resp_body(llhttp_t *p, const char *at, size_t len)
{
    struct check *k = p->data;
    if (k->body_len + len > sizeof k->body)
        __builtin_trap(); /* no answer of imdsd's is this large */
    memcpy(k->body + k->body_len, at, len);
    k->body_len += len;
    return 0;
}

static int on_resp_begin(llhttp_t *p)
{
    struct check *k = p->data;
    k->in_message = 1;
    k->has_length = k->field_ct = k->field_cl = 0;
    k->field_len = k->ctype_len = k->body_len = 0;
    return 0;
}

static int on_resp_done(llhttp_t *p)
{
    struct check *k = p->data;
    k->nresp++;
    k->in_message = 0;
    if (p->http_major != 1 || p->http_minor != 1 || !k->has_length)
        __builtin_trap();
    int status = p->status_code;
    if (status < 200 || status > 599)
        __builtin_trap();
    k->ctype[k->ctype_len] = 0;
    if (strncmp(k->ctype, "application/json", 16) == 0) {
        struct json_obj o;
        if (json_parse_object(&o, k->body, k->body_len) < 0)
            __builtin_trap();
        json_obj_free(&o);
    }
    /* a token leaves only in a 200; the identity secret never */
    if (status != 200 && memmem(k->body, k->body_len, "FUZZ-ACCESS-TOKEN", 17))
        __builtin_trap();
    return 0;
}

static void check_answers(const char *out, size_t len, const uint8_t *in, size_t inlen)
{
    static struct check k;
    static llhttp_settings_t s;
    if (!s.on_message_complete) {
        llhttp_settings_init(&s);
        s.on_message_begin = on_resp_begin;
        s.on_status = on_status_text;
        s.on_header_field = on_field;
        s.on_header_field_complete = on_field_done;
        s.on_header_value = on_value;
        s.on_body = on_resp_body;
        s.on_message_complete = on_resp_done;
    }
    llhttp_init(&k.p, HTTP_RESPONSE, &s);
    k.p.data = &k;
    k.nresp = k.in_message = 0;
    if (getenv("FUZZ_HTTP_SHOW"))
        fwrite(out, 1, len, stderr);
    if (len && llhttp_execute(&k.p, out, len) != HPE_OK)
        __builtin_trap(); /* not a clean sequence of responses */
    if (k.in_message)
        __builtin_trap(); /* the last answer was cut */
    if (memmem(out, len, SECRET, sizeof SECRET - 1) &&
        !memmem(in, inlen, SECRET, sizeof SECRET - 1))
        __builtin_trap();
}

/* ---- one client ----------------------------------------------------------------------------- */

static char out[1 << 20];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int init;
    if (!init) {
        uv_loop_init(&loop);
        log_min_level = LOG_OFF;
        signal(SIGPIPE, SIG_IGN); /* as main.c does: a peer gone is an error return, not a kill */
        init = 1;
    }
    if (size < 2)
        return 0;
    flags = data[0];
    size_t cut = data[1];
    data += 2;
    size -= 2;

    static char *allowed[] = {"11111111-2222-3333-4444-555555555555",
                              "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"};
    static char *hosts[] = {"imdsd.internal"};
    static char *resources[] = {"https://vault.azure.net"};
    struct config cfg = {.client_id = allowed[0],
                         .token_file = "/nonexistent/token",
                         .allowed_client_ids = {allowed[0], allowed[1]},
                         .nallowed = 2,
                         .aliases = {{"0b000000-0000-4000-8000-000000000001", allowed[1]}},
                         .naliases = 1,
                         .max_connections = 4,
                         .idle_timeout_s = 60,
                         .header_timeout_s = 10,
                         .entra_timeout_s = 5};
    if (flags & 0x40) {
        cfg.allowed_hosts[0] = hosts[0];
        cfg.nallowed_hosts = 1;
    }
    if (flags & 0x80) {
        cfg.allowed_resources[0] = resources[0];
        cfg.nallowed_resources = 1;
    }
    struct token_cache_opts co = {.entra_timeout_s = cfg.entra_timeout_s};
    struct token_cache *cache = token_cache_new(&loop, &co, NULL, NULL);
    struct endpoints ep;
    char err[256];
    if (endpoints_init(&ep, &loop, &cfg, cache, NULL, err, sizeof err) < 0)
        abort();
    if (flags & 0x08) {
        cfg.identity_header = SECRET;
        cfg.identity_header_len = sizeof SECRET - 1;
    }
    if (flags & 0x08)
        ep.secrets =
            (struct secret_watch *)&ep; /* any non-NULL: secret_watch_get is the stand-in */
    struct http_server_opts o = {.max_connections = {4, 4},
                                 .idle_timeout_ms = 60000,
                                 .header_timeout_ms = 10000,
                                 .error_body = endpoints_error_body};
    struct http_server *srv = http_server_new(&loop, &o, endpoints_handle, &ep);

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    int tag = (flags & 0x04) ? LISTENER_HEALTH : LISTENER_TOKENS;
    size_t off = 0, got = 0;
    /* the first write lands before the server's first read, like a client that sends at once */
    size_t first = cut ? (cut < size ? cut : size) : size;
    if (first && write(sv[1], data, first) != (ssize_t)first)
        abort();
    off = first;
    http_server_adopt(srv, sv[0], tag);
    int spins = 0;
    for (;;) {
        if (off < size) {
            size_t n = cut ? (cut < size - off ? cut : size - off) : size - off;
            ssize_t w = write(sv[1], data + off, n);
            if (w > 0)
                off += (size_t)w;
            else if (w < 0 && errno != EAGAIN)
                off = size + 1; /* the server closed: the rest is not sent, like a real client */
        } else if (off == size) {
            shutdown(sv[1], SHUT_WR); /* the client is done sending */
            off++;
        }
        uv_run(&loop, UV_RUN_NOWAIT);
        ssize_t r;
        while ((r = read(sv[1], out + got, sizeof out - got)) > 0)
            got += (size_t)r;
        if (off > size && http_server_connections(srv) == 0)
            break;
        if (++spins > 100000)
            __builtin_trap(); /* the server neither answered nor closed: a hang */
    }
    ssize_t r;
    while ((r = read(sv[1], out + got, sizeof out - got)) > 0)
        got += (size_t)r;
    close(sv[1]);
    check_answers(out, got, data, size);

    http_server_free(srv);
    token_cache_free(cache);
    uv_run(&loop, UV_RUN_DEFAULT); /* let the handles close */
    return 0;
}
