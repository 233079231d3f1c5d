/* proxy_answer.h - the HTTP CONNECT proxy's answer to CONNECT, parsed as it arrives (llhttp in
 * response mode). Pure: no I/O; https_client feeds it what it reads from the proxy.
 *
 * The answer is a status line and headers, never a body: the tunnel (if any) begins right after
 * the empty line. Interim 1xx answers are skipped. */
#ifndef IMDSD_PROXY_ANSWER_H
#define IMDSD_PROXY_ANSWER_H

#include <llhttp.h>
#include <stddef.h>

#define PROXY_ANSWER_REASON_MAX 64 /* the reason phrase is truncated to this */

enum proxy_answer_result {
    PROXY_ANSWER_MORE = 0,    /* not complete yet: feed the next bytes */
    PROXY_ANSWER_OPEN = 1,    /* a 2xx: the tunnel is open, the bytes after *used are its own */
    PROXY_ANSWER_REFUSED = 2, /* a final answer that is not 2xx (status, reason, why set) */
    PROXY_ANSWER_BAD = -1,    /* not HTTP, or over the cap (why set) */
};

struct proxy_answer {
    llhttp_t parser; /* its data points at the struct: do not copy a struct in use */
    size_t max;      /* cap on the answer's bytes (status line + headers) */
    size_t bytes;    /* fed so far, at most max */
    int status;      /* the final status, once known */
    char reason[PROXY_ANSWER_REASON_MAX + 1]; /* the final answer's reason phrase, raw */
    size_t reason_len;
};

/* Starts a new answer of at most max bytes. */
void proxy_answer_init(struct proxy_answer *a, size_t max);

/* Feeds the next n bytes from the proxy. On PROXY_ANSWER_OPEN *used is how many of them the
 * answer took (data + *used onwards belongs to the tunnel); on REFUSED and BAD why holds one line
 * for the logs (the reason phrase is raw: quote it when logging). No more bytes may be fed after
 * anything but PROXY_ANSWER_MORE. */
int proxy_answer_feed(struct proxy_answer *a, const char *data, size_t n, size_t *used, char *why,
                      size_t whylen);

#endif
