/* One background thread, at the lowest CPU priority of the process, for work that takes
 * milliseconds of CPU and must never delay the event loop: a full TLS handshake's signature checks
 * and key exchange, while cached tokens are being answered.
 *
 * Why not libuv's thread pool: a pool thread hands its result back with uv_async_send, and in
 * libuv 1.44 (Debian 12) the loop spins with sched_yield while a sender is inside that call. If
 * the sender runs at a lower priority than the loop, the loop preempts it there and spins until
 * the scheduler lets the sender finish: milliseconds of the loop's CPU per handshake step, so a
 * pool thread cannot be given a lower priority. This thread hands results back through an eventfd
 * the loop polls, which nothing spins on, and runs at nice 19: on a CPU shared with the loop the
 * kernel runs the loop first whenever it has work. Nice orders threads within the process's own
 * cgroup, so it never puts imdsd behind the application. Linux only (a thread's own nice value).
 *
 * Jobs run one at a time, in the order submitted. Everything but work() runs on the loop. */
#ifndef IMDSD_WORKER_H
#define IMDSD_WORKER_H

#include <uv.h>

#define WORKER_NICE 19

struct worker;
struct worker_job;

typedef void worker_work_cb(struct worker_job *j);               /* on the worker thread */
typedef void worker_done_cb(struct worker_job *j, int canceled); /* on the loop */

struct worker_job {
    worker_work_cb *work;
    worker_done_cb *done;
    void *data;
    /* private */
    struct worker_job *next;
    int state;
    int canceled;
};

/* A worker for loop. The thread starts with the first job. Returns 0, or -1 with err set. */
int worker_new(struct worker **out, uv_loop_t *loop, char *err, size_t errlen);

/* Queues j; j->done is called exactly once on the loop, after j->work ran (canceled 0) or without
 * it (canceled 1: worker_cancel, or the thread could not be started). While jobs are outstanding
 * the worker keeps the loop alive, as uv_queue_work does. */
void worker_submit(struct worker *w, struct worker_job *j);

/* If j has not started, it never will: its done is called (canceled 1) on a later loop turn. If it
 * runs, or ran, this does nothing: done follows as usual. */
void worker_cancel(struct worker *w, struct worker_job *j);

/* Jobs submitted whose done has not been called; of them, those that have not started. */
unsigned worker_outstanding(const struct worker *w);
unsigned worker_queued(struct worker *w);

/* Stops the thread and frees w once its handle has closed; no job may be outstanding. Safe from
 * within a done callback. */
void worker_free(struct worker *w);

#endif
