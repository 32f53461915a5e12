/* SSE subscribers in C, to check whether bench/run.py's Python subscribers are what
 * limits S2's latency at 1 msg/s (they are not: both clients measure the same p99).
 *
 *   sse_subscribers PORT PATH_FORMAT N PROCESSES SECONDS CPU
 *
 * PROCESSES processes (pinned to CPU) open N streams between them (GET PATH_FORMAT % i,
 * from 127.0.0.2-9), then for SECONDS note the latency of every event whose data is a
 * bench payload of step 7 (`data: 7 <send time, monotonic ns> ...`). Prints the
 * count and p50/p99 of publish-to-receive latency.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
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

#define MAX_SAMPLES 1000000
#define TAG "data: 7 "

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int by_value(const void *x, const void *y) {
    long long a = *(const long long *)x, b = *(const long long *)y;
    return a < b ? -1 : a > b;
}

static int subscribe(int port, const char *path_format, int id, int ep) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl(0x7f000002 + id % 8);
    bind(fd, (struct sockaddr *)&src, sizeof src);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst)) {
        perror("connect");
        exit(1);
    }
    char path[256], request[512];
    snprintf(path, sizeof path, path_format, id);
    int size = snprintf(request, sizeof request,
                        "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
                        path);
    if (write(fd, request, size) != size) perror("write");
    struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    return fd;
}

/* Reads until the deadline; returns how many latencies it wrote into samples. */
static int listen_for_events(int ep, double seconds, long long *samples) {
    long long end = now_ns() + (long long)(seconds * 1e9);
    int count = 0;
    char buf[65536];
    struct epoll_event ready[1024];
    while (now_ns() < end) {
        int n = epoll_wait(ep, ready, 1024, 200);
        long long t = now_ns();
        for (int k = 0; k < n; k++) {
            int got = read(ready[k].data.fd, buf, sizeof buf - 1);
            if (got <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, ready[k].data.fd, NULL);
                continue;
            }
            buf[got] = 0;
            for (char *p = buf; (p = strstr(p, TAG)) != NULL;) {
                p += strlen(TAG);
                if (count < MAX_SAMPLES) samples[count++] = t - atoll(p);
            }
        }
    }
    return count;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s PORT PATH_FORMAT N PROCESSES SECONDS CPU\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), processes = atoi(argv[4]), cpu = atoi(argv[6]);
    int per = atoi(argv[3]) / processes;
    double seconds = atof(argv[5]);
    int shared = MAP_SHARED | MAP_ANONYMOUS, rw = PROT_READ | PROT_WRITE;
    long long *samples = mmap(0, sizeof(long long) * MAX_SAMPLES * processes, rw, shared, -1, 0);
    int *counts = mmap(0, sizeof(int) * processes, rw, shared, -1, 0);
    for (int p = 0; p < processes; p++) {
        if (fork() == 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpu, &set);
            sched_setaffinity(0, sizeof set, &set);
            int ep = epoll_create1(0);
            for (int i = 0; i < per; i++) subscribe(port, argv[2], p * per + i, ep);
            counts[p] = listen_for_events(ep, seconds, samples + (long long)p * MAX_SAMPLES);
            exit(0);
        }
    }
    for (int p = 0; p < processes; p++) wait(0);
    long long total = 0;
    for (int p = 0; p < processes; p++) {
        memmove(samples + total, samples + (long long)p * MAX_SAMPLES, sizeof(long long) * counts[p]);
        total += counts[p];
    }
    if (total == 0) {
        printf("no events\n");
        return 1;
    }
    qsort(samples, total, sizeof(long long), by_value);
    printf("%lld events: latency p50 %.1f ms, p99 %.1f ms\n", total, samples[total / 2] / 1e6,
           samples[(long long)(total * 0.99)] / 1e6);
    return 0;
}
