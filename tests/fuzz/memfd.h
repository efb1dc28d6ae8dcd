/*
 * memfd.h — the fuzz harnesses' way to hand bytes to a loader that takes a path: the bytes go into an
 * anonymous memory file, whose /proc/self/fd path the loader opens. Header only (each harness is one
 * translation unit); needs _GNU_SOURCE before any include, for memfd_create.
 */
#ifndef MOQAE_FUZZ_MEMFD_H
#define MOQAE_FUZZ_MEMFD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

/* Writes data to a new memfd and its path to path[64]; returns the fd (close it after use), or -1
 * when the memfd cannot be made or written. */
static inline int fuzz_memfd(const char * name, const uint8_t * data, size_t size, char path[64]) {
    const int fd = memfd_create(name, 0);
    if (fd < 0) {
        return -1;
    }
    size_t done = 0;
    while (done < size) {
        const ssize_t w = write(fd, data + done, size - done);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        done += (size_t) w;
    }
    snprintf(path, 64, "/proc/self/fd/%d", fd);
    return fd;
}

#endif
