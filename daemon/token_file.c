#include "token_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

/* Runs on a thread-pool thread: blocking I/O is fine here. */
static void work(uv_work_t *w)
{
    struct token_file_read *r = w->data;
    int fd = open(r->path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        r->err = -errno;
        return;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        r->err = fstat(fd, &st) < 0 ? -errno : -EISDIR;
        close(fd);
        return;
    }
    char *buf = xmalloc(TOKEN_FILE_MAX_BYTES + 1);
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, buf + len, TOKEN_FILE_MAX_BYTES + 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            r->err = -errno;
            goto fail;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len > TOKEN_FILE_MAX_BYTES) {
            r->err = -EFBIG;
            goto fail;
        }
    }
    close(fd);
    size_t start = 0;
    while (start < len && strchr(" \t\r\n", buf[start]))
        start++;
    while (len > start && strchr(" \t\r\n", buf[len - 1]))
        len--;
    if (len == start) {
        r->err = -ENODATA;
        secret_zero(buf, TOKEN_FILE_MAX_BYTES + 1);
        free(buf);
        return;
    }
    memmove(buf, buf + start, len - start);
    r->len = len - start;
    buf[r->len] = 0;
    r->content = buf;
    r->err = 0;
    return;
fail:
    close(fd);
    secret_zero(buf, TOKEN_FILE_MAX_BYTES + 1);
    free(buf);
}

static void after(uv_work_t *w, int status)
{
    struct token_file_read *r = w->data;
    if (!r->canceled)
        r->done(r, status < 0 ? status : r->err, r->err ? NULL : r->content, r->len);
    if (r->content) {
        secret_zero(r->content, r->len);
        free(r->content);
        r->content = NULL;
    }
    if (r->self_free)
        free(r);
}

int token_file_read(uv_loop_t *loop, struct token_file_read *r, const char *path)
{
    r->work.data = r;
    r->path = path;
    r->canceled = 0;
    r->err = 0;
    r->content = NULL;
    r->len = 0;
    return uv_queue_work(loop, &r->work, work, after);
}

struct token_file_read *token_file_read_new(token_file_done_cb *done, void *data)
{
    struct token_file_read *r = xcalloc(1, sizeof *r);
    r->self_free = 1;
    r->done = done;
    r->data = data;
    return r;
}

void token_file_cancel(struct token_file_read *r)
{
    r->canceled = 1;
}

const char *token_file_strerror(int err)
{
    switch (err) {
    case -EFBIG: return "token file is larger than 64 KiB";
    case -ENODATA: return "token file is empty";
    case -EISDIR: return "token path is not a regular file";
    default: return strerror(-err);
    }
}
