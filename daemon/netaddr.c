/* netaddr.c - one RTM_NEWADDR request on a NETLINK_ROUTE socket, and its acknowledgement.
 *
 * This is the whole privileged part of the IMDS-address option: a pod's init container runs
 * `imdsd --add-loopback-address 169.254.169.254` with CAP_NET_ADMIN alone, and exits; the
 * sidecar then listens on 169.254.169.254:80 without any capability (the pod's
 * net.ipv4.ip_unprivileged_port_start sysctl lets it bind port 80). No iptables, no redirect:
 * the address simply becomes local to the pod's network namespace. */
#include "netaddr.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

struct addr_request {
    struct nlmsghdr nh;
    struct ifaddrmsg ifa;
    char attrs[2 * RTA_SPACE(sizeof(struct in_addr))];
};

static void put_attr(struct nlmsghdr *nh, unsigned short type, const void *data, size_t len)
{
    struct rtattr *rta = (struct rtattr *)((char *)nh + NLMSG_ALIGN(nh->nlmsg_len));
    rta->rta_type = type;
    rta->rta_len = (unsigned short)RTA_LENGTH(len);
    memcpy(RTA_DATA(rta), data, len);
    nh->nlmsg_len = NLMSG_ALIGN(nh->nlmsg_len) + RTA_SPACE(len);
}

int netaddr_add_loopback(const char *ip, char *err, size_t errlen)
{
    struct in_addr addr;
    if (inet_pton(AF_INET, ip, &addr) != 1) {
        snprintf(err, errlen, "'%s' is not an IPv4 address", ip);
        return NETADDR_ERROR;
    }
    unsigned lo = if_nametoindex("lo");
    if (lo == 0) {
        snprintf(err, errlen, "no loopback interface 'lo': %s", strerror(errno));
        return NETADDR_ERROR;
    }
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) {
        snprintf(err, errlen, "netlink socket: %s", strerror(errno));
        return NETADDR_ERROR;
    }
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    struct addr_request req;
    memset(&req, 0, sizeof req);
    req.nh.nlmsg_len = NLMSG_LENGTH(sizeof req.ifa);
    req.nh.nlmsg_type = RTM_NEWADDR;
    req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    req.nh.nlmsg_seq = 1;
    req.ifa.ifa_family = AF_INET;
    req.ifa.ifa_prefixlen = 32;
    req.ifa.ifa_scope = RT_SCOPE_UNIVERSE;
    req.ifa.ifa_index = lo;
    put_attr(&req.nh, IFA_LOCAL, &addr, sizeof addr);
    put_attr(&req.nh, IFA_ADDRESS, &addr, sizeof addr);

    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    int rc = NETADDR_ERROR;
    if (sendto(fd, &req, req.nh.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) {
        snprintf(err, errlen, "netlink send: %s", strerror(errno));
        goto out;
    }
    /* the acknowledgement: an NLMSG_ERROR carrying 0 or -errno */
    union {
        struct nlmsghdr nh;
        char bytes[4096];
    } ack;
    for (;;) {
        ssize_t n = recv(fd, &ack, sizeof ack, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            snprintf(err, errlen, "netlink receive: %s", strerror(errno));
            goto out;
        }
        size_t left = (size_t)n;
        for (struct nlmsghdr *nh = &ack.nh; NLMSG_OK(nh, left); nh = NLMSG_NEXT(nh, left)) {
            if (nh->nlmsg_seq != req.nh.nlmsg_seq || nh->nlmsg_type != NLMSG_ERROR)
                continue;
            if (nh->nlmsg_len < NLMSG_LENGTH(sizeof(struct nlmsgerr))) {
                snprintf(err, errlen, "netlink: truncated acknowledgement");
                goto out;
            }
            int e = -((struct nlmsgerr *)NLMSG_DATA(nh))->error;
            if (e == 0)
                rc = NETADDR_ADDED;
            else if (e == EEXIST)
                rc = NETADDR_PRESENT;
            else if (e == EPERM || e == EACCES)
                snprintf(
                    err, errlen,
                    "adding %s/32 to lo: %s (needs CAP_NET_ADMIN in the pod's network namespace)",
                    ip, strerror(e));
            else
                snprintf(err, errlen, "adding %s/32 to lo: %s", ip, strerror(e));
            goto out;
        }
    }
out:
    close(fd);
    return rc;
}
