/* Writing a file through a shared mapping, safely: shared by both extensions
   (the log's tail in _accel, a run's index sections in _runs). */

#ifndef L2_MAPPING_H
#define L2_MAPPING_H

#include <stddef.h>
#include <sys/types.h>

#include "internal.h"

/* 1 when the file system of fd allocates the blocks fallocate asks for and
   writes them in place (ext2/3/4, XFS, tmpfs), so that a store into a
   mapping of allocated blocks never meets a full disk (which would kill the
   process with SIGBUS); 0 elsewhere; -1 with errno set when fstatfs fails. */
L2_INTERNAL int mapping_safe(int fd);

/* Allocate bytes [offset, offset + length) of fd (the file grows to cover
   them, reading zeros) and map bytes 0 .. offset + length shared, read and
   write: the mapping, or NULL (errno set) when that cannot be done here or
   now; then nothing is mapped (the file may have grown). */
L2_INTERNAL unsigned char *mapping_allocate(int fd, off_t offset, size_t length);

/* Unmap what mapping_allocate mapped for offset + length bytes. */
L2_INTERNAL void mapping_release(unsigned char *map, size_t size);

/* A transient buffer of size zeroed bytes, or NULL: from an anonymous
   mapping when it is as large as malloc's default mmap threshold (128 KiB),
   else from malloc. A mapping goes back to the system when released; a
   large block malloc itself had mapped would, once freed, raise glibc's
   threshold to its size, and every later block of that size would come
   from the heap and stay resident after its release (about 10 MB of a
   10M-binding store's private memory, the merges' and flushes' buffers). */
L2_INTERNAL void *buffer_allocate(size_t size);

/* Give back what buffer_allocate gave (NULL: nothing). */
L2_INTERNAL void buffer_release(void *buffer);

#endif
