/*
 * RTP load generator and sink for the media relay benchmark (tests/bench/media_bench.py).
 *
 *   media_gen STREAMS_FILE RATE SECONDS
 *
 * STREAMS_FILE has one line per stream: "local_ip local_port remote_ip remote_port".
 * Each stream gets its own UDP socket bound to local_ip:local_port; it sends to
 * remote_ip:remote_port and receives whatever comes back to that socket (the relay
 * forwards the other direction of the call to it). Packets are 172 bytes: a 12-byte
 * RTP header (PCMU, 20 ms) and 160 bytes of payload that begin with the stream index
 * and the send time (CLOCK_MONOTONIC ns). RATE packets/s are spread evenly over all
 * streams (packet j at t0 + j/RATE goes to stream j mod N), for SECONDS (<= 60).
 * RATE 0 with SECONDS 0 "primes": 3 packets per stream 1 ms apart (latching), then
 * 300 ms of receiving.
 *
 * Prints one JSON line: sent, received, late (> 100 ms), the achieved send rate, and
 * how far behind schedule the sender fell. Everything is bounded: the send loop by the
 * packet count and a wall-clock deadline, the receive loop by a deadline.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PACKET 172
#define LATE_NS 100000000ULL
#define MAX_SECONDS 60
#define DRAIN_NS 300000000ULL
#define BATCH 64

struct stream {
    int fd;
    struct sockaddr_storage remote;
    socklen_t remote_len;
    uint32_t seq;
};

static struct stream *streams;
static int nstreams;
static volatile int sending_done;
static uint64_t send_end_ns;
static int epfd;
static uint64_t received, late, max_latency_ns;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static int parse_addr(const char *ip, int port, struct sockaddr_storage *ss, socklen_t *len) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, ip, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons(port);
        *len = sizeof *s4;
        return AF_INET;
    }
    if (inet_pton(AF_INET6, ip, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons(port);
        *len = sizeof *s6;
        return AF_INET6;
    }
    return -1;
}

static void send_one(int index, uint64_t t) {
    struct stream *s = &streams[index];
    unsigned char packet[PACKET] = {0};
    packet[0] = 0x80; /* RTP v2, PT 0 */
    packet[2] = s->seq >> 8;
    packet[3] = s->seq;
    uint32_t ts = htonl(s->seq * 160), ssrc = htonl(index + 1), idx = index;
    memcpy(packet + 4, &ts, 4);
    memcpy(packet + 8, &ssrc, 4);
    memcpy(packet + 12, &idx, 4);
    memcpy(packet + 16, &t, 8);
    s->seq++;
    /* A full socket buffer is loss the benchmark must see, not a reason to stall. */
    sendto(s->fd, packet, PACKET, MSG_DONTWAIT, (struct sockaddr *)&s->remote, s->remote_len);
}

static void *receiver(void *arg) {
    (void)arg;
    struct epoll_event events[BATCH];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    static unsigned char bufs[BATCH][2048];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    for (;;) {
        if (sending_done && now_ns() > send_end_ns + DRAIN_NS)
            break;
        int n = epoll_wait(epfd, events, BATCH, 20);
        for (int e = 0; e < n; e++) {
            int fd = events[e].data.fd;
            for (;;) {
                int got = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0)
                    break;
                uint64_t t = now_ns();
                for (int i = 0; i < got; i++) {
                    if (msgs[i].msg_len < 24)
                        continue;
                    uint64_t sent;
                    memcpy(&sent, bufs[i] + 16, 8);
                    uint64_t latency = t > sent ? t - sent : 0;
                    received++;
                    if (latency > LATE_NS)
                        late++;
                    if (latency > max_latency_ns)
                        max_latency_ns = latency;
                }
                if (got < BATCH)
                    break;
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s STREAMS_FILE RATE SECONDS\n", argv[0]);
        return 2;
    }
    double rate = atof(argv[2]), seconds = atof(argv[3]);
    if (seconds > MAX_SECONDS)
        seconds = MAX_SECONDS;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);

    FILE *f = fopen(argv[1], "r");
    if (!f) {
        perror(argv[1]);
        return 1;
    }
    int cap = 1024;
    streams = calloc(cap, sizeof *streams);
    char lip[64], rip[64];
    int lport, rport;
    epfd = epoll_create1(0);
    while (fscanf(f, "%63s %d %63s %d", lip, &lport, rip, &rport) == 4) {
        if (nstreams == cap) {
            cap *= 2;
            streams = realloc(streams, cap * sizeof *streams);
        }
        struct stream *s = &streams[nstreams];
        memset(s, 0, sizeof *s);
        struct sockaddr_storage local;
        socklen_t llen;
        int family = parse_addr(lip, lport, &local, &llen);
        if (family < 0 || parse_addr(rip, rport, &s->remote, &s->remote_len) != family) {
            fprintf(stderr, "bad line %d\n", nstreams + 1);
            return 1;
        }
        s->fd = socket(family, SOCK_DGRAM, 0);
        int size = 1 << 20;
        setsockopt(s->fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
        if (s->fd < 0 || bind(s->fd, (struct sockaddr *)&local, llen) != 0) {
            fprintf(stderr, "bind %s:%d: %s\n", lip, lport, strerror(errno));
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = s->fd};
        epoll_ctl(epfd, EPOLL_CTL_ADD, s->fd, &ev);
        nstreams++;
    }
    fclose(f);
    if (nstreams == 0) {
        fprintf(stderr, "no streams\n");
        return 1;
    }

    pthread_t rx;
    pthread_create(&rx, NULL, receiver, NULL);
    uint64_t total, t0 = now_ns(), sent = 0, max_behind = 0;
    if (rate <= 0) {
        /* Prime: a few packets per stream so the relay latches every source. */
        for (int round = 0; round < 3; round++) {
            for (int i = 0; i < nstreams; i++)
                send_one(i, now_ns());
            sent += nstreams;
            usleep(1000);
        }
        total = sent;
    } else {
        total = (uint64_t)(rate * seconds);
        uint64_t deadline = t0 + (uint64_t)(seconds * 1e9) + 1000000000ULL;
        while (sent < total) {
            uint64_t t = now_ns();
            if (t > deadline)
                break;
            uint64_t due = (uint64_t)((t - t0) * rate / 1e9) + 1;
            if (due > total)
                due = total;
            if (due > sent + 1) {
                uint64_t behind = (uint64_t)((due - sent) * 1e9 / rate);
                if (behind > max_behind)
                    max_behind = behind;
            }
            while (sent < due) {
                send_one((int)(sent % nstreams), t);
                sent++;
            }
            struct timespec pause = {0, 100000}; /* 0.1 ms */
            nanosleep(&pause, NULL);
        }
    }
    send_end_ns = now_ns();
    sending_done = 1;
    pthread_join(rx, NULL);
    double elapsed = (send_end_ns - t0) / 1e9;
    printf("{\"streams\": %d, \"sent\": %lu, \"received\": %lu, \"late\": %lu, "
           "\"max_latency_ms\": %.3f, \"elapsed\": %.4f, \"send_rate\": %.1f, "
           "\"max_behind_ms\": %.3f}\n",
           nstreams, (unsigned long)sent, (unsigned long)received, (unsigned long)late,
           max_latency_ns / 1e6, elapsed, elapsed > 0 ? sent / elapsed : 0.0, max_behind / 1e6);
    return 0;
}
