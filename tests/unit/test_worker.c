/* worker.c: the low-priority thread that runs TLS handshake steps off the event loop. Each test
 * runs its own loop and ends with uv_loop_close() == 0: nothing is left open. */
#include <pthread.h>
#include <signal.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "worker.h"

#define JOBS 16

struct fixture {
    uv_loop_t loop;
    struct worker *w;
    pthread_t loop_thread;
    /* what the jobs saw, written by the worker thread, read once the loop has its done */
    int ran[JOBS];
    int order[JOBS + 1]; /* order[k]: the job that ran kth */
    int nran;
    int busy, overlap; /* work()s running at once */
    int nice_seen[JOBS];
    int other_thread[JOBS];
    int signals_blocked[JOBS]; /* SIGTERM, SIGHUP and SIGINT blocked in work() */
    /* what the loop saw */
    int done_calls[JOBS];
    int done_canceled[JOBS];
    int done_order[JOBS + 1];
    int ndone;
    int free_in_done; /* job index whose done frees the worker, or -1 */
    /* a gate a job can wait at */
    pthread_mutex_t gate_lock;
    pthread_cond_t gate_cond;
    int gate_open, at_gate;
};

struct job {
    struct worker_job j;
    struct fixture *f;
    int i;
    int wait_at_gate;
};

static void job_work(struct worker_job *wj)
{
    struct job *jb = wj->data;
    struct fixture *f = jb->f;
    if (__atomic_add_fetch(&f->busy, 1, __ATOMIC_SEQ_CST) > 1)
        __atomic_store_n(&f->overlap, 1, __ATOMIC_SEQ_CST);
    f->other_thread[jb->i] = !pthread_equal(pthread_self(), f->loop_thread);
    f->nice_seen[jb->i] = getpriority(PRIO_PROCESS, 0);
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    f->signals_blocked[jb->i] =
        sigismember(&cur, SIGTERM) && sigismember(&cur, SIGHUP) && sigismember(&cur, SIGINT);
    if (jb->wait_at_gate) {
        pthread_mutex_lock(&f->gate_lock);
        f->at_gate = 1;
        pthread_cond_broadcast(&f->gate_cond);
        while (!f->gate_open)
            pthread_cond_wait(&f->gate_cond, &f->gate_lock);
        pthread_mutex_unlock(&f->gate_lock);
    } else {
        usleep(500); /* long enough for a second thread, if there were one, to overlap */
    }
    f->ran[jb->i]++;
    f->order[f->nran++] = jb->i;
    __atomic_sub_fetch(&f->busy, 1, __ATOMIC_SEQ_CST);
}

static void job_done(struct worker_job *wj, int canceled)
{
    struct job *jb = wj->data;
    struct fixture *f = jb->f;
    assert_true(pthread_equal(pthread_self(), f->loop_thread));
    f->done_calls[jb->i]++;
    f->done_canceled[jb->i] = canceled;
    f->done_order[f->ndone++] = jb->i;
    if (jb->i == f->free_in_done) {
        assert_int_equal(worker_outstanding(f->w), 0);
        worker_free(f->w);
        f->w = NULL;
    }
}

static void job_init(struct job *jb, struct fixture *f, int i)
{
    memset(jb, 0, sizeof *jb);
    jb->j.work = job_work;
    jb->j.done = job_done;
    jb->j.data = jb;
    jb->f = f;
    jb->i = i;
}

static void wait_at_gate(struct fixture *f)
{
    pthread_mutex_lock(&f->gate_lock);
    while (!f->at_gate)
        pthread_cond_wait(&f->gate_cond, &f->gate_lock);
    pthread_mutex_unlock(&f->gate_lock);
}

static void open_gate(struct fixture *f)
{
    pthread_mutex_lock(&f->gate_lock);
    f->gate_open = 1;
    pthread_cond_broadcast(&f->gate_cond);
    pthread_mutex_unlock(&f->gate_lock);
}

static int fx_setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    char err[128] = "";
    if (!f || uv_loop_init(&f->loop) != 0)
        return -1;
    f->loop_thread = pthread_self();
    f->free_in_done = -1;
    pthread_mutex_init(&f->gate_lock, NULL);
    pthread_cond_init(&f->gate_cond, NULL);
    if (worker_new(&f->w, &f->loop, err, sizeof err) != 0) {
        print_error("worker_new: %s\n", err);
        return -1;
    }
    *state = f;
    return 0;
}

static int fx_teardown(void **state)
{
    struct fixture *f = *state;
    open_gate(f);
    if (f->w)
        worker_free(f->w);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    int r = uv_loop_close(&f->loop);
    pthread_mutex_destroy(&f->gate_lock);
    pthread_cond_destroy(&f->gate_cond);
    free(f);
    assert_int_equal(r, 0);
    return 0;
}

/* A worker with nothing to do keeps no loop alive, and starts no thread. */
static void test_idle_worker_keeps_loop_free(void **state)
{
    struct fixture *f = *state;
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(worker_outstanding(f->w), 0);
    assert_int_equal(worker_queued(f->w), 0);
}

/* Jobs run on another thread at nice WORKER_NICE with every signal blocked, one at a time, in the
 * order submitted; each done runs once on the loop, in the same order; the loop stays alive exactly
 * until the last done. */
static void test_jobs_run_in_order_one_at_a_time(void **state)
{
    struct fixture *f = *state;
    struct job jobs[JOBS];
    for (int i = 0; i < JOBS; i++) {
        job_init(&jobs[i], f, i);
        worker_submit(f->w, &jobs[i].j);
    }
    assert_int_equal(worker_outstanding(f->w), JOBS);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(worker_outstanding(f->w), 0);
    assert_int_equal(f->nran, JOBS);
    assert_int_equal(f->ndone, JOBS);
    assert_false(f->overlap);
    for (int i = 0; i < JOBS; i++) {
        assert_int_equal(f->ran[i], 1);
        assert_int_equal(f->order[i], i);
        assert_int_equal(f->done_order[i], i);
        assert_int_equal(f->done_calls[i], 1);
        assert_int_equal(f->done_canceled[i], 0);
        assert_true(f->other_thread[i]);
        assert_int_equal(f->nice_seen[i], WORKER_NICE);
        assert_true(f->signals_blocked[i]); /* they are the loop's */
    }
    /* the worker can be used again after going idle */
    job_init(&jobs[0], f, 0);
    worker_submit(f->w, &jobs[0].j);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(f->ran[0], 2);
    assert_int_equal(f->done_calls[0], 2);
}

/* A queued job canceled never runs, and its done says so; canceling the running job changes
 * nothing (its done follows as usual); the job after the canceled one still runs. */
static void test_cancel(void **state)
{
    struct fixture *f = *state;
    struct job a, b, c;
    job_init(&a, f, 0);
    job_init(&b, f, 1);
    job_init(&c, f, 2);
    a.wait_at_gate = 1;
    worker_submit(f->w, &a.j);
    worker_submit(f->w, &b.j);
    worker_submit(f->w, &c.j);
    wait_at_gate(f); /* a runs; b and c wait */
    assert_int_equal(worker_queued(f->w), 2);
    worker_cancel(f->w, &b.j);
    worker_cancel(f->w, &a.j);
    assert_int_equal(worker_queued(f->w), 1);
    assert_int_equal(worker_outstanding(f->w), 3);
    uv_run(&f->loop, UV_RUN_NOWAIT); /* b's done comes while a still runs */
    assert_int_equal(f->done_calls[1], 1);
    assert_int_equal(f->done_canceled[1], 1);
    assert_int_equal(f->done_calls[0], 0);
    open_gate(f);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(f->ran[0], 1);
    assert_int_equal(f->ran[1], 0);
    assert_int_equal(f->ran[2], 1);
    assert_int_equal(f->done_calls[0], 1);
    assert_int_equal(f->done_canceled[0], 0);
    assert_int_equal(f->done_calls[1], 1);
    assert_int_equal(f->done_calls[2], 1);
    assert_int_equal(f->done_canceled[2], 0);
    worker_cancel(f->w, &c.j); /* done already: nothing happens */
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(f->done_calls[2], 1);
}

/* The last job's done frees the worker (as https_client_free's last connection does): the thread
 * is joined, the handle closes, nothing leaks (fx_teardown). */
static void test_free_from_done(void **state)
{
    struct fixture *f = *state;
    struct job a, b;
    job_init(&a, f, 0);
    job_init(&b, f, 1);
    f->free_in_done = 1;
    worker_submit(f->w, &a.j);
    worker_submit(f->w, &b.j);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_null(f->w);
    assert_int_equal(f->done_calls[0], 1);
    assert_int_equal(f->done_calls[1], 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_idle_worker_keeps_loop_free, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_jobs_run_in_order_one_at_a_time, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_cancel, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_free_from_done, fx_setup, fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
