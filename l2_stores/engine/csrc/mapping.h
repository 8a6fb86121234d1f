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

#endif
