/* File-system questions the engine asks: may a log be written through a
   map there (mappable), and can blocks be reserved ahead (reserve). */

#define PY_SSIZE_T_CLEAN
#ifdef __linux__
#define _GNU_SOURCE /* sync_file_range, fallocate */
#endif
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "accel.h"
#include "mapping.h"

/* mappable(fd) -> bool: whether the file system of ``fd`` is one where a
   log may be written through a shared mapping: one that allocates the
   blocks posix_fallocate asks for (so a store into the mapping never meets
   a full disk, which would kill the process with SIGBUS) and writes them in
   place (no copy on write). ext2/3/4, XFS and tmpfs; anything else writes. */
PyObject *
accel_mappable(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0)
        return NULL;
    int safe;
    Py_BEGIN_ALLOW_THREADS
    safe = mapping_safe(fd);
    Py_END_ALLOW_THREADS
    if (safe < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(safe);
}

/* reserve(fd, offset, length) -> bool | None: allocate the file's blocks
   of [offset, offset + length) without changing its size (Linux's
   FALLOC_FL_KEEP_SIZE), so appends there need no block allocation. True
   when done; False when it failed this time (no room, interrupted: part of
   the range may be allocated); None when the platform or the file system
   cannot. Appends need none of it: they allocate what is missing, and
   report a full disk themselves. */
PyObject *
accel_reserve(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    long long offset, length;
    if (!PyArg_ParseTuple(args, "iLL:reserve", &fd, &offset, &length))
        return NULL;
    if (offset < 0 || length <= 0) {
        PyErr_SetString(PyExc_ValueError, "reserve: offset at least 0, length at least 1");
        return NULL;
    }
#if defined(__linux__) && defined(FALLOC_FL_KEEP_SIZE)
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
    Py_END_ALLOW_THREADS
    if (!failed)
        Py_RETURN_TRUE;
    if (errno == EBADF) /* a caller's mistake, not a file system's refusal */
        return PyErr_SetFromErrno(PyExc_OSError);
    if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL)
        Py_RETURN_FALSE;
#else
    (void)fd;
#endif
    Py_RETURN_NONE;
}
