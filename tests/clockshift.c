/* The wall clock of one process, read from a file: for redis-server, which Debian's libfaketime cannot start
 * (Debian links redis-server with jemalloc, whose first allocation calls clock_gettime while libfaketime is still
 * initialising: libfaketime issue #130). Preloaded (LD_PRELOAD) with CLOCKSHIFT_FILE naming a file that holds
 * "=<µs since the epoch>" (the clock stands there) or "+<µs>" / "-<µs>" (added to the real clock), read on every
 * call. Only CLOCK_REALTIME moves: the monotonic clock, which Redis's event loop runs on, stays real. It never
 * allocates, so no allocator can recurse into it. Built by tests/clock.py with cc. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long shifted(long long real_us) {
    const char *path = getenv("CLOCKSHIFT_FILE");
    char text[40];
    int fd = path ? open(path, O_RDONLY) : -1;
    if (fd < 0) return real_us;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 1) return real_us;
    text[n] = 0;
    long long value = strtoll(text + 1, NULL, 10);
    return text[0] == '=' ? value : text[0] == '-' ? real_us - value : real_us + value;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int rc = (int)syscall(SYS_clock_gettime, id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        long long us = shifted(ts->tv_sec * 1000000LL + ts->tv_nsec / 1000);
        ts->tv_sec = us / 1000000;
        ts->tv_nsec = (us % 1000000) * 1000;
    }
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0 && tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
