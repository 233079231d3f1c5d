#include "proxy_answer.h"

#include <stdio.h>
#include <string.h>

static int on_status(llhttp_t *p, const char *at, size_t len)
{
    struct proxy_answer *a = p->data;
    size_t room = PROXY_ANSWER_REASON_MAX - a->reason_len;
    if (len > room)
        len = room;
    memcpy(a->reason + a->reason_len, at, len);
    a->reason_len += len;
    a->reason[a->reason_len] = 0;
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    struct proxy_answer *a = p->data;
    if (p->status_code < 200) { /* interim 1xx: the real answer follows */
        a->reason_len = 0;
        a->reason[0] = 0;
        return 1;
    }
    return 2; /* no body: stop here with HPE_PAUSED_UPGRADE, the tunnel (if any) begins */
}

static const llhttp_settings_t settings = {
    .on_status = on_status,
    .on_headers_complete = on_headers_complete,
};

void proxy_answer_init(struct proxy_answer *a, size_t max)
{
    memset(a, 0, sizeof *a);
    a->max = max;
    llhttp_init(&a->parser, HTTP_RESPONSE, &settings);
    a->parser.data = a;
}

int proxy_answer_feed(struct proxy_answer *a, const char *data, size_t n, size_t *used, char *why,
                      size_t whylen)
{
    size_t allowed = a->max - a->bytes;
    size_t feed = n < allowed ? n : allowed;

    *used = 0;
    a->bytes += feed;
    llhttp_errno_t e = feed ? llhttp_execute(&a->parser, data, feed) : HPE_OK;
    if (e == HPE_PAUSED_UPGRADE) {
        a->status = a->parser.status_code;
        *used = (size_t)(llhttp_get_error_pos(&a->parser) - data);
        if (a->status < 200 || a->status > 299) {
            snprintf(why, whylen, "proxy answered CONNECT with %d %s", a->status, a->reason);
            return PROXY_ANSWER_REFUSED;
        }
        return PROXY_ANSWER_OPEN;
    }
    if (e != HPE_OK) {
        const char *r = llhttp_get_error_reason(&a->parser);
        snprintf(why, whylen, "invalid answer to CONNECT: %s: %s", llhttp_errno_name(e),
                 r ? r : "");
        return PROXY_ANSWER_BAD;
    }
    if (feed < n) {
        snprintf(why, whylen, "answer to CONNECT over %zu bytes", a->max);
        return PROXY_ANSWER_BAD;
    }
    return PROXY_ANSWER_MORE;
}
