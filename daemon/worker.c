/* The low-priority background thread: see worker.h. */
#include "worker.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

enum { JOB_QUEUED = 1, JOB_RUNNING, JOB_DONE };

struct worker {
    uv_loop_t *loop;
    uv_poll_t poll; /* readable when done jobs wait for the loop */
    int efd;
    unsigned outstanding;
    int polling;
    int closing;

    pthread_mutex_t lock; /* guards everything below */
    pthread_cond_t wake;
    struct worker_job *queue_head, *queue_tail; /* to run, in order */
    struct worker_job *done_head, *done_tail;   /* for the loop, in order */
    int started, stop;
    int nice_errno; /* setpriority's errno, for the loop to log once */
    pthread_t thread;
};

static void append(struct worker_job **head, struct worker_job **tail, struct worker_job *j)
{
    j->next = NULL;
    if (*tail)
        (*tail)->next = j;
    else
        *head = j;
    *tail = j;
}

/* Tells the loop that done jobs wait; called without the lock held. */
static void poke(struct worker *w)
{
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(w->efd, &one, sizeof one);
    while (r < 0 && errno == EINTR);
    /* EAGAIN: the counter is already far from zero, the loop will look */
}

static void *thread_main(void *arg)
{
    struct worker *w = arg;
    /* The thread's own nice value (Linux: PRIO_PROCESS with 0 names the calling thread). Raising
     * it needs no privilege; a failure only costs the loop some latency. */
    int e = setpriority(PRIO_PROCESS, 0, WORKER_NICE) < 0 ? errno : 0;
    pthread_mutex_lock(&w->lock);
    w->nice_errno = e;
    for (;;) {
        while (!w->queue_head && !w->stop)
            pthread_cond_wait(&w->wake, &w->lock);
        if (w->stop)
            break;
        struct worker_job *j = w->queue_head;
        w->queue_head = j->next;
        if (!w->queue_head)
            w->queue_tail = NULL;
        j->state = JOB_RUNNING;
        pthread_mutex_unlock(&w->lock);

        j->work(j);

        pthread_mutex_lock(&w->lock);
        j->state = JOB_DONE;
        int first = w->done_head == NULL;
        append(&w->done_head, &w->done_tail, j);
        if (first) {
            pthread_mutex_unlock(&w->lock);
            poke(w);
            pthread_mutex_lock(&w->lock);
        }
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

static void poll_cb(uv_poll_t *h, int status, int events)
{
    struct worker *w = h->data;
    uint64_t n;
    (void)status;
    (void)events;
    while (read(w->efd, &n, sizeof n) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&w->lock);
    struct worker_job *j = w->done_head;
    w->done_head = w->done_tail = NULL;
    int e = w->nice_errno;
    w->nice_errno = 0;
    pthread_mutex_unlock(&w->lock);
    if (e)
        log_warn("worker_priority", "nice=%d error=\"%s\"", WORKER_NICE, strerror(e));
    while (j) {
        struct worker_job *next = j->next;
        assert(w->outstanding > 0);
        if (--w->outstanding == 0 && w->polling) {
            uv_poll_stop(&w->poll);
            w->polling = 0;
        }
        j->next = NULL;
        j->state = 0;
        j->done(j, j->canceled);
        if (w->closing) { /* freed from the callback: nothing can be left */
            assert(!next);
            return;
        }
        j = next;
    }
}

int worker_new(struct worker **out, uv_loop_t *loop, char *err, size_t errlen)
{
    struct worker *w = xcalloc(1, sizeof *w);
    *out = NULL;
    w->loop = loop;
    w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->efd < 0) {
        snprintf(err, errlen, "eventfd: %s", strerror(errno));
        free(w);
        return -1;
    }
    int r = uv_poll_init(loop, &w->poll, w->efd);
    if (r < 0) {
        snprintf(err, errlen, "uv_poll_init: %s", uv_strerror(r));
        close(w->efd);
        free(w);
        return -1;
    }
    w->poll.data = w;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->wake, NULL);
    *out = w;
    return 0;
}

void worker_submit(struct worker *w, struct worker_job *j)
{
    assert(!w->closing && !j->state);
    j->canceled = 0;
    if (w->outstanding++ == 0 && !w->polling) {
        uv_poll_start(&w->poll, UV_READABLE, poll_cb);
        w->polling = 1;
    }
    pthread_mutex_lock(&w->lock);
    if (!w->started) {
        /* the thread starts with every signal blocked: they are the loop's (libuv's handlers) */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int r = pthread_create(&w->thread, NULL, thread_main, w);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (r != 0) {
            log_error("worker_start_failed", "error=\"%s\"", strerror(r));
            j->canceled = 1;
            j->state = JOB_DONE;
            append(&w->done_head, &w->done_tail, j);
            pthread_mutex_unlock(&w->lock);
            poke(w);
            return;
        }
        w->started = 1;
    }
    j->state = JOB_QUEUED;
    append(&w->queue_head, &w->queue_tail, j);
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->lock);
}

void worker_cancel(struct worker *w, struct worker_job *j)
{
    pthread_mutex_lock(&w->lock);
    if (j->state != JOB_QUEUED) {
        pthread_mutex_unlock(&w->lock);
        return;
    }
    struct worker_job *prev = NULL;
    for (struct worker_job *o = w->queue_head; o != j; o = o->next)
        prev = o;
    if (prev)
        prev->next = j->next;
    else
        w->queue_head = j->next;
    if (w->queue_tail == j)
        w->queue_tail = prev;
    j->canceled = 1;
    j->state = JOB_DONE;
    append(&w->done_head, &w->done_tail, j);
    pthread_mutex_unlock(&w->lock);
    poke(w);
}

unsigned worker_outstanding(const struct worker *w)
{
    return w->outstanding;
}

unsigned worker_queued(struct worker *w)
{
    unsigned n = 0;
    pthread_mutex_lock(&w->lock);
    for (const struct worker_job *j = w->queue_head; j; j = j->next)
        n++;
    pthread_mutex_unlock(&w->lock);
    return n;
}

static void close_cb(uv_handle_t *h)
{
    struct worker *w = h->data;
    close(w->efd);
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->wake);
    free(w);
}

void worker_free(struct worker *w)
{
    if (!w)
        return;
    assert(w->outstanding == 0 && !w->closing);
    w->closing = 1;
    pthread_mutex_lock(&w->lock);
    w->stop = 1;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->lock);
    if (w->started) /* idle: no job is outstanding, so this returns at once */
        pthread_join(w->thread, NULL);
    uv_close((uv_handle_t *)&w->poll, close_cb);
}
