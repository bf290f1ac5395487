/*
 * Sends forged uevents, for the agent's refusal tests. Never part of the product.
 *
 *   forge-uevent multicast DEVPATH   a process multicasts to the kernel uevent group (1):
 *                                    needs CAP_NET_ADMIN in the network namespace
 *   forge-uevent kernel DEVPATH      a process asks the kernel to broadcast it
 *                                    (uevent_net_rcv_skb): needs CAP_SYS_ADMIN over the
 *                                    namespace; the kernel sends it with portid 0 but keeps
 *                                    the sender's credentials
 * Both forge an "add" of a block disk at DEVPATH. Exit 0 if the send succeeded.
 * Build: cc -O2 -o forge-uevent forge-uevent.c
 */
#include <linux/netlink.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s multicast|kernel DEVPATH\n", argv[0]);
        return 2;
    }
    char body[1024];
    int n = snprintf(body, sizeof body, "add@%s%cACTION=add%cDEVPATH=%s%cSUBSYSTEM=block%cDEVTYPE=disk%cDEVNAME=forged%c",
                     argv[2], 0, 0, argv[2], 0, 0, 0, 0);
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    struct sockaddr_nl self = {.nl_family = AF_NETLINK};
    if (bind(fd, (struct sockaddr *)&self, sizeof self) < 0) {
        perror("bind");
        return 1;
    }
    struct sockaddr_nl dst = {.nl_family = AF_NETLINK};
    if (strcmp(argv[1], "multicast") == 0) {
        dst.nl_groups = 1;
        if (sendto(fd, body, (size_t)n, 0, (struct sockaddr *)&dst, sizeof dst) < 0) {
            perror("sendto group 1");
            return 1;
        }
        return 0;
    }
    /* To the kernel (portid 0, no group): a netlink message whose payload is the uevent. */
    char msg[NLMSG_SPACE(1024)];
    struct nlmsghdr *h = (struct nlmsghdr *)msg;
    memset(msg, 0, sizeof msg);
    h->nlmsg_len = NLMSG_LENGTH((unsigned)n);
    h->nlmsg_type = NLMSG_MIN_TYPE;
    h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    memcpy(NLMSG_DATA(h), body, (size_t)n);
    if (sendto(fd, msg, h->nlmsg_len, 0, (struct sockaddr *)&dst, sizeof dst) < 0) {
        perror("sendto kernel");
        return 1;
    }
    char ack[256];
    ssize_t r = recv(fd, ack, sizeof ack, 0);
    if (r >= (ssize_t)NLMSG_LENGTH(sizeof(struct nlmsgerr))) {
        struct nlmsgerr *e = NLMSG_DATA((struct nlmsghdr *)ack);
        if (e->error != 0) {
            fprintf(stderr, "kernel refused the injection: %s\n", strerror(-e->error));
            return 1;
        }
    }
    return 0;
}
