/* Writing a file through a shared mapping, safely (see mapping.h). */

#ifdef __linux__
#define _GNU_SOURCE /* fallocate */
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/vfs.h>
#endif

#include "mapping.h"

int
mapping_safe(int fd)
{
#ifdef __linux__
    struct statfs info;
    if (fstatfs(fd, &info))
        return -1;
    switch ((unsigned long)info.f_type) {
    case 0xEF53UL:     /* ext2, ext3, ext4 */
    case 0x58465342UL: /* XFS */
    case 0x01021994UL: /* tmpfs */
        return 1;
    default:
        return 0;
    }
#else
    (void)fd;
    return 0;
#endif
}

unsigned char *
mapping_allocate(int fd, off_t offset, size_t length)
{
#ifdef __linux__
    int safe = mapping_safe(fd);
    if (safe <= 0) {
        if (safe == 0)
            errno = EOPNOTSUPP;
        return NULL;
    }
    int failed;
    do
        failed = fallocate(fd, 0, offset, (off_t)length);
    while (failed && errno == EINTR);
    if (failed)
        return NULL;
    void *map = mmap(NULL, (size_t)offset + length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return map == MAP_FAILED ? NULL : (unsigned char *)map;
#else
    (void)fd, (void)offset, (void)length;
    errno = EOPNOTSUPP;
    return NULL;
#endif
}

void
mapping_release(unsigned char *map, size_t size)
{
    if (map != NULL)
        munmap(map, size);
}

/* Ahead of each buffer: its whole size, and whether it is a mapping (16
   bytes, so that the buffer keeps malloc's alignment). */
#define BUFFER_HEADER 16
#define BUFFER_MAPPED_FROM ((size_t)128 * 1024)

void *
buffer_allocate(size_t size)
{
    size_t total = size + BUFFER_HEADER;
    if (total < size)
        return NULL;
    unsigned char *block;
    size_t mapped = total >= BUFFER_MAPPED_FROM;
    if (mapped) {
        void *map = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        block = map == MAP_FAILED ? NULL : (unsigned char *)map;
    } else {
        block = calloc(1, total);
    }
    if (block == NULL)
        return NULL;
    ((size_t *)block)[0] = total;
    ((size_t *)block)[1] = mapped;
    return block + BUFFER_HEADER;
}

void
buffer_release(void *buffer)
{
    if (buffer == NULL)
        return;
    unsigned char *block = (unsigned char *)buffer - BUFFER_HEADER;
    if (((size_t *)block)[1])
        munmap(block, ((size_t *)block)[0]);
    else
        free(block);
}
