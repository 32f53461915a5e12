/* The kernel's floor for a broadcast on this machine: how long one process needs to
 * write one small event to each of N loopback TCP connections, with no server logic.
 *
 *   broadcast_floor N READERS WRITER_CPU READER_CPU
 *
 * The writer (pinned to WRITER_CPU) accepts N connections made by READERS processes
 * (pinned to READER_CPU), then five times, a second apart, writes 120 bytes to every
 * connection in a loop. Readers wait in epoll and note when each event arrives.
 * Prints the time of each write loop and the p50/p99 of write-to-receive latency:
 * what any single-core server (C or Python) can at best reach in S2 at 1 msg/s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 5

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static int by_value(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

static void read_events(struct sockaddr_in *server, int first, int count, double *latency,
                        volatile double *sent_at, int total) {
    int ep = epoll_create1(0);
    int *fds = malloc(sizeof(int) * count);
    for (int i = 0; i < count; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fds[i], (struct sockaddr *)server, sizeof *server)) {
            perror("connect");
            exit(1);
        }
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e);
    }
    char buf[4096];
    struct epoll_event ready[512];
    for (int got = 0; got < count * ROUNDS;) {
        int n = epoll_wait(ep, ready, 512, 10000);
        if (n <= 0) break;
        double t = now();
        for (int k = 0; k < n; k++) {
            int i = ready[k].data.u32;
            if (read(fds[i], buf, sizeof buf) > 0) {
                int round = buf[0] - '0';
                latency[round * total + first + i] = t - sent_at[round];
                got++;
            }
        }
    }
    exit(0);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s N READERS WRITER_CPU READER_CPU\n", argv[0]);
        return 2;
    }
    int readers = atoi(argv[2]), writer_cpu = atoi(argv[3]), reader_cpu = atoi(argv[4]);
    int per = atoi(argv[1]) / readers, total = per * readers, one = 1;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in server = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t size = sizeof server;
    bind(listener, (struct sockaddr *)&server, sizeof server);
    listen(listener, 4096);
    getsockname(listener, (struct sockaddr *)&server, &size);
    int shared = MAP_SHARED | MAP_ANONYMOUS, rw = PROT_READ | PROT_WRITE;
    double *latency = mmap(0, sizeof(double) * total * ROUNDS, rw, shared, -1, 0);
    volatile double *sent_at = mmap(0, sizeof(double) * ROUNDS, rw, shared, -1, 0);
    for (int r = 0; r < readers; r++) {
        if (fork() == 0) {
            pin(reader_cpu);
            read_events(&server, r * per, per, latency, sent_at, total);
        }
    }
    pin(writer_cpu);
    int *conns = malloc(sizeof(int) * total);
    for (int i = 0; i < total; i++) {
        conns[i] = accept(listener, 0, 0);
        setsockopt(conns[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    char event[120];
    memset(event, 'x', sizeof event);
    sleep(1);
    for (int round = 0; round < ROUNDS; round++) {
        event[0] = '0' + round;
        double start = sent_at[round] = now();
        for (int i = 0; i < total; i++) {
            if (write(conns[i], event, sizeof event) != sizeof event) perror("write");
        }
        double took = now() - start;
        printf("write loop %d: %.1f ms, %.2f us per write\n", round, took * 1e3, took * 1e6 / total);
        sleep(1);
    }
    for (int r = 0; r < readers; r++) wait(0);
    int samples = total * ROUNDS;
    qsort(latency, samples, sizeof(double), by_value);
    printf("%d connections, %d readers: latency p50 %.1f ms, p99 %.1f ms, max %.1f ms\n", total,
           readers, latency[samples / 2] * 1e3, latency[(int)(samples * 0.99)] * 1e3,
           latency[samples - 1] * 1e3);
    return 0;
}
