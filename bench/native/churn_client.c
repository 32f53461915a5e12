/* A churn client in C, to check whether bench/run.py's Python load generator is what
 * limits a server's S4 figure (it is for Nchan: its load core sits at 99 %).
 *
 *   churn_client PORT PATH_FORMAT MARKER USERS PROCESSES CONCURRENCY SECONDS CPU
 *
 * Each of PROCESSES (pinned to CPU) keeps CONCURRENCY connections cycling: connect
 * from 127.0.0.2.., send GET PATH_FORMAT % user, read until MARKER (Sisyphus: the `ok`
 * status; Nchan: the end of the response head), close, start over. Prints cycles/s.
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

typedef struct {
    int fd;
    int sent;
    int len;
    char buf[2048];
} Conn;

static int port, users, processes, process;
static long started;
static const char *path_format, *marker;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void connect_one(int ep, Conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    c->sent = c->len = 0;
    /* Sixteen source addresses: each has its own ephemeral ports and TIME_WAITs. */
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl(0x7f000002 + (started + process) % 16);
    bind(c->fd, (struct sockaddr *)&src, sizeof src);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connect(c->fd, (struct sockaddr *)&dst, sizeof dst);
    struct epoll_event e = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
}

static long churn(int concurrency, double seconds) {
    int ep = epoll_create1(0);
    Conn *conns = calloc(concurrency, sizeof(Conn));
    for (int i = 0; i < concurrency; i++) connect_one(ep, &conns[i]);
    double end = now() + seconds;
    long cycles = 0;
    struct epoll_event ready[256];
    char request[512], path[256];
    while (now() < end) {
        int n = epoll_wait(ep, ready, 256, 100);
        for (int k = 0; k < n; k++) {
            Conn *c = ready[k].data.ptr;
            if (!c->sent && (ready[k].events & EPOLLOUT)) {
                snprintf(path, sizeof path, path_format, (int)((started++ * processes + process) % users));
                int size = snprintf(request, sizeof request,
                                    "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                    "Accept: text/event-stream\r\n\r\n", path);
                if (write(c->fd, request, size) != size) perror("write");
                c->sent = 1;
                struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                continue;
            }
            int got = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
            if (got > 0) c->len += got;
            int done = got > 0 && memmem(c->buf, c->len, marker, strlen(marker)) != NULL;
            if (done || got <= 0 || c->len >= (int)sizeof c->buf - 1) {
                cycles += done;
                close(c->fd);
                connect_one(ep, c);
            }
        }
    }
    return cycles;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s PORT PATH_FORMAT MARKER USERS PROCESSES CONCURRENCY SECONDS CPU\n",
                argv[0]);
        return 2;
    }
    port = atoi(argv[1]);
    path_format = argv[2];
    marker = argv[3];
    users = atoi(argv[4]);
    processes = atoi(argv[5]);
    int concurrency = atoi(argv[6]), cpu = atoi(argv[8]);
    double seconds = atof(argv[7]);
    long *cycles = mmap(0, sizeof(long) * processes, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    for (process = 0; process < processes; process++) {
        if (fork() == 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpu, &set);
            sched_setaffinity(0, sizeof set, &set);
            cycles[process] = churn(concurrency, seconds);
            exit(0);
        }
    }
    long total = 0;
    for (int p = 0; p < processes; p++) wait(0);
    for (int p = 0; p < processes; p++) total += cycles[p];
    printf("%ld cycles in %.0f s: %.0f cycles/s\n", total, seconds, total / seconds);
    return 0;
}
