/* metrics_render.h - the Prometheus text exposition of the counters in metrics.h, with the values
 * read from the modules that hold them (the token file, the cache, the HTTP server). Apart from
 * metrics.h so that the counters header names no module: whatever counts includes metrics.h
 * alone. */
#ifndef IMDSD_METRICS_RENDER_H
#define IMDSD_METRICS_RENDER_H

struct buf;
struct token_file;
struct token_cache;
struct http_server;

/* Renders every metric in the Prometheus text format (version 0.0.4) into b. */
void metrics_render(struct buf *b, struct token_file *tf, struct token_cache *cache,
                    struct http_server *server);

#endif
