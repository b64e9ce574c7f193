/*
 * ember-agent: the network at boot: loopback up, and eth0 configured statically
 * from ember.net= when the machine has a NIC.
 */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

/* ----------------------------------------------------------------- network */

void loopback_up(void)
{
    struct ifreq ifr;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) logmsg("lo up: %s", strerror(errno));
    }
    close(s);
}

/*
 * What Docker sets for every container: any user may bind ports below 1024 (an
 * image whose app runs as a non-root user and listens on 80 just works) and
 * open ICMP echo sockets (ping without privileges). The guest is the app's
 * alone, so the privileged-port rule protects nothing here.
 */
void net_sysctls(void)
{
    write_file("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0\n");
    write_file("/proc/sys/net/ipv4/ping_group_range", "0 2147483647\n");
}

/*
 * ember.net=ADDR/PREFIX,GATEWAY,DNS: configure eth0 statically (no DHCP client,
 * no wait for a lease): address and netmask, up, default route, resolv.conf.
 * The host only passes it when the machine has a NIC; any failure is fatal, so
 * a machine never runs without the network it was asked to have.
 */
struct netcfg {
    struct in_addr addr, mask, gw, dns;
};

static int parse_netcfg(const char *val, struct netcfg *c)
{
    char buf[128], *prefix, *gw, *dns, *end;
    long bits;
    if (snprintf(buf, sizeof buf, "%s", val) >= (int)sizeof buf) return -1;
    if (!(prefix = strchr(buf, '/'))) return -1;
    *prefix++ = 0;
    if (!(gw = strchr(prefix, ','))) return -1;
    *gw++ = 0;
    if (!(dns = strchr(gw, ','))) return -1;
    *dns++ = 0;
    errno = 0;
    bits = strtol(prefix, &end, 10);
    if (errno || end == prefix || *end || bits < 1 || bits > 32) return -1;
    if (inet_pton(AF_INET, buf, &c->addr) != 1 || inet_pton(AF_INET, gw, &c->gw) != 1 ||
        inet_pton(AF_INET, dns, &c->dns) != 1)
        return -1;
    c->mask.s_addr = htonl(bits == 32 ? 0xffffffffu : ~(0xffffffffu >> bits));
    return 0;
}

static void set_sin(struct sockaddr *sa, struct in_addr a)
{
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_addr = a;
    memcpy(sa, &sin, sizeof sin);
}

void net_up(const char *val)
{
    const char *ifname = "eth0";
    struct netcfg c;
    struct ifreq ifr;
    struct rtentry rt;
    char buf[128];
    long long end = now_ms(CLOCK_MONOTONIC) + 5000;
    int s;

    if (parse_netcfg(val, &c) < 0) die("ember.net=%s: expected ADDR/PREFIX,GATEWAY,DNS", val);
    /* virtio-net probes before init runs; wait a little in case it is late */
    snprintf(buf, sizeof buf, "/sys/class/net/%s", ifname);
    while (access(buf, F_OK) < 0) {
        if (now_ms(CLOCK_MONOTONIC) > end) die("ember.net: no network interface %s", ifname);
        sleep_ms(10);
    }
    /* IPv4 only (the host's NAT has no IPv6): no link-local address, no router
       solicitations, no duplicate address detection on this link */
    snprintf(buf, sizeof buf, "/proc/sys/net/ipv6/conf/%s/disable_ipv6", ifname);
    if (access(buf, F_OK) == 0) write_file(buf, "1\n");
    s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("ember.net: socket: %s", strerror(errno));
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
    set_sin(&ifr.ifr_addr, c.addr);
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0) die("%s: set address: %s", ifname, strerror(errno));
    set_sin(&ifr.ifr_netmask, c.mask);
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0) die("%s: set netmask: %s", ifname, strerror(errno));
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) die("%s: get flags: %s", ifname, strerror(errno));
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) die("%s: up: %s", ifname, strerror(errno));
    memset(&rt, 0, sizeof rt);
    set_sin(&rt.rt_dst, (struct in_addr){ INADDR_ANY });
    set_sin(&rt.rt_genmask, (struct in_addr){ INADDR_ANY });
    set_sin(&rt.rt_gateway, c.gw);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = (char *)ifname;
    if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
        die("%s: default route via %s: %s", ifname, inet_ntoa(c.gw), strerror(errno));
    close(s);
    net_resolv(val);
}

/* /etc/resolv.conf for ember.net=...: at boot, and again in a late root. */
void net_resolv(const char *val)
{
    struct netcfg c;
    char buf[128];
    if (parse_netcfg(val, &c) < 0) die("ember.net=%s: expected ADDR/PREFIX,GATEWAY,DNS", val);
    /* into the overlay's upper layer; replace, never follow, an image's symlink */
    mkdirs("/etc", 0755);
    snprintf(buf, sizeof buf, "nameserver %s\n", inet_ntoa(c.dns));
    unlink("/etc/resolv.conf");
    write_file("/etc/resolv.conf", buf);
}
