// uds-load: HTTP/1.1 keep-alive load on a Unix socket, so that the client is not the bottleneck.
//
//   uds-load SOCKET CONNECTIONS SECONDS [PATH]
//
// Each connection runs in its own thread and sends GET PATH (default /token) back to back on one
// keep-alive connection. Prints requests/second, and p50/p99 latency in microseconds, as one line:
//   requests=N seconds=S rps=R p50_us=A p99_us=B errors=E
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 4000000

static const char *socket_path;
static const char *target = "/token";
static double duration;
static volatile int stop;

struct worker {
    pthread_t thread;
    long requests;
    long errors;
    unsigned *samples; // latency in microseconds
    long sample_count;
};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int connect_socket(void) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    strncpy(address.sun_path, socket_path, sizeof(address.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&address, sizeof(address)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

// Reads one response; returns 0 on a complete 200, -1 otherwise.
static int read_response(int fd, char *buffer, size_t size) {
    size_t used = 0;
    long body_needed = -1;
    char *body = NULL;
    for (;;) {
        ssize_t n = read(fd, buffer + used, size - used - 1);
        if (n <= 0) return -1;
        used += n;
        buffer[used] = 0;
        if (!body) {
            char *end = strstr(buffer, "\r\n\r\n");
            if (!end) continue;
            body = end + 4;
            char *length = strcasestr(buffer, "Content-Length:");
            body_needed = length ? strtol(length + 15, NULL, 10) : 0;
        }
        if ((long)(used - (body - buffer)) >= body_needed) return strncmp(buffer, "HTTP/1.1 200", 12) == 0 ? 0 : -1;
    }
}

static void *run(void *argument) {
    struct worker *worker = argument;
    char request[256];
    int length = snprintf(request, sizeof(request), "GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n", target);
    char buffer[65536];
    int fd = connect_socket();
    while (!stop) {
        if (fd < 0) { worker->errors++; usleep(1000); fd = connect_socket(); continue; }
        double started = now();
        if (write(fd, request, length) != length || read_response(fd, buffer, sizeof(buffer)) != 0) {
            worker->errors++;
            close(fd);
            fd = connect_socket();
            continue;
        }
        worker->requests++;
        if (worker->sample_count < MAX_SAMPLES) worker->samples[worker->sample_count++] = (unsigned)((now() - started) * 1e6);
    }
    if (fd >= 0) close(fd);
    return NULL;
}

static int compare(const void *a, const void *b) {
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s SOCKET CONNECTIONS SECONDS [PATH]\n", argv[0]);
        return 64;
    }
    // A server closing a keep-alive connection must cost a reconnect, not the process.
    signal(SIGPIPE, SIG_IGN);
    socket_path = argv[1];
    int connections = atoi(argv[2]);
    duration = atof(argv[3]);
    if (argc > 4) target = argv[4];
    struct worker *workers = calloc(connections, sizeof(*workers));
    for (int i = 0; i < connections; i++) {
        workers[i].samples = malloc(sizeof(unsigned) * MAX_SAMPLES / connections);
        pthread_create(&workers[i].thread, NULL, run, &workers[i]);
    }
    double started = now();
    usleep((useconds_t)(duration * 1e6));
    stop = 1;
    long requests = 0, errors = 0, samples = 0;
    for (int i = 0; i < connections; i++) {
        pthread_join(workers[i].thread, NULL);
        requests += workers[i].requests;
        errors += workers[i].errors;
        samples += workers[i].sample_count;
    }
    double elapsed = now() - started;
    unsigned *all = malloc(sizeof(unsigned) * (samples + 1));
    long k = 0;
    for (int i = 0; i < connections; i++) {
        memcpy(all + k, workers[i].samples, sizeof(unsigned) * workers[i].sample_count);
        k += workers[i].sample_count;
    }
    qsort(all, samples, sizeof(unsigned), compare);
    printf("requests=%ld seconds=%.2f rps=%.0f p50_us=%u p99_us=%u errors=%ld\n", requests, elapsed, requests / elapsed,
           samples ? all[samples / 2] : 0, samples ? all[samples * 99 / 100] : 0, errors);
    return errors ? 1 : 0;
}
