/* test_token_file.c - the token file on a real loop and a real plain file rewritten in place
 * (truncated, then written in two steps): a read caught in between never serves the cut token,
 * whose signature part still decodes (Entra would reject it as a permanent error). */
#include "unit.h"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "b64url.h"
#include "token_file.h"

/* A JWT that decodes (exp in an hour) whose signature part is 342 characters (RS256, 2048 bits):
 * cut to 300 of them it still is valid base64url. */
static void make_jwt(const char *sub, char *out)
{
    char payload[128], h[64], p[192];
    snprintf(payload, sizeof payload,
             "{\"iss\":\"https://issuer.example\",\"sub\":\"%s\",\"exp\":%lld}", sub,
             (long long)time(NULL) + 3600);
    b64url("{\"alg\":\"RS256\",\"typ\":\"JWT\"}", 27, h);
    b64url(payload, strlen(payload), p);
    int n = sprintf(out, "%s.%s.", h, p);
    for (int i = 0; i < 341; i++)
        out[n + i] = "abcdefghijklmnopqrstuvwxyz0123456789-_"[i % 38];
    out[n + 341] = 'A'; /* canonical: the bits past the last byte are zero */
    out[n + 342] = 0;
}

struct got {
    int calls;
    enum token_state state;
    char tok[1024];
    size_t len;
};

static void on_token(void *arg, const struct token_file_status *st, const char *tok, size_t len)
{
    struct got *g = arg;
    g->calls++;
    g->state = st->state;
    g->len = len;
    if (tok && len < sizeof g->tok)
        memcpy(g->tok, tok, len);
}

static void get(uv_loop_t *loop, struct token_file *tf, struct got *g)
{
    struct token_file_waiter w = {.cb = on_token, .arg = g};
    int before = g->calls;
    token_file_get(tf, &w);
    while (g->calls == before)
        uv_run(loop, UV_RUN_ONCE);
}

struct rest {
    int fd;
    const char *bytes;
};

static void write_rest(uv_timer_t *t)
{
    struct rest *r = t->data;
    assert_int_equal(write(r->fd, r->bytes, strlen(r->bytes)), (ssize_t)strlen(r->bytes));
    close(r->fd);
}

static void t_rewritten_in_place(void **state)
{
    (void)state;
    char dir[] = "/tmp/imdsd-tf-XXXXXX", path[64], j1[1024], j2[1024];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/token", dir);
    make_jwt("first", j1);
    make_jwt("second", j2);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(j1, f);
    fclose(f);
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct token_file *tf = token_file_new(&loop, path);
    struct got g = {0};
    get(&loop, tf, &g);
    assert_int_equal(g.state, TOKEN_OK);
    assert_int_equal(g.len, strlen(j1));

    /* truncated and written up to 42 characters short; the rest 20 ms later */
    size_t cut = strlen(j2) - 42;
    int fd = open(path, O_WRONLY | O_TRUNC);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, j2, cut), (ssize_t)cut);
    struct rest r = {fd, j2 + cut};
    uv_timer_t t;
    uv_timer_init(&loop, &t);
    t.data = &r;
    uv_timer_start(&t, write_rest, 20, 0);
    get(&loop, tf, &g);
    assert_int_equal(g.state, TOKEN_OK);
    assert_int_equal(g.len, strlen(j2));
    assert_memory_equal(g.tok, j2, g.len);

    uv_close((uv_handle_t *)&t, NULL);
    token_file_free(tf);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    unlink(path);
    rmdir(dir);
}

int main(void)
{
    add("token_file", "a file rewritten in place is never read half-written", t_rewritten_in_place,
        NULL);
    return _cmocka_run_group_tests("token_file", tests, ntests, NULL, NULL);
}
