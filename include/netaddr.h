/* netaddr.h - imdsd's one-shot init mode: put an IPv4 address on the loopback interface. */
#ifndef IMDSD_NETADDR_H
#define IMDSD_NETADDR_H

#include <stddef.h>

enum netaddr_result { NETADDR_ADDED = 0, NETADDR_PRESENT = 1, NETADDR_ERROR = -1 };

/* Adds ip/32 to "lo" in the caller's network namespace over rtnetlink (what `ip addr add ip/32
 * dev lo` does), so that connections to ip stay in the namespace. Needs CAP_NET_ADMIN there.
 * ip must be a dotted IPv4 address. Returns NETADDR_ADDED, NETADDR_PRESENT (already there: not
 * an error, so the init container can run again), or NETADDR_ERROR with one line in err. */
int netaddr_add_loopback(const char *ip, char *err, size_t errlen);

#endif
