// read-floor: the physical floor for serving a token: open(2), read(2) and close(2) of the token
// file, back to back, in THREADS threads for SECONDS.
//
//   read-floor FILE THREADS SECONDS
//
// Prints: reads=N seconds=S rps=R
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static const char *path;
static volatile int stop;

static void *run(void *argument) {
    long *count = argument;
    char buffer[65536];
    while (!stop) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        if (read(fd, buffer, sizeof(buffer)) > 0) (*count)++;
        close(fd);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s FILE THREADS SECONDS\n", argv[0]);
        return 64;
    }
    path = argv[1];
    int threads = atoi(argv[2]);
    double seconds = atof(argv[3]);
    pthread_t *ids = calloc(threads, sizeof(*ids));
    long *counts = calloc(threads, sizeof(*counts));
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, run, &counts[i]);
    usleep((useconds_t)(seconds * 1e6));
    stop = 1;
    long total = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(ids[i], NULL);
        total += counts[i];
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    double elapsed = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
    printf("reads=%ld seconds=%.2f rps=%.0f\n", total, elapsed, total / elapsed);
    return 0;
}
