/* Framed records: the parts of a record, then the CRC-32 of them all, built or
   written in one call (framing.py's framed and write_framed), and crc32 itself. */

#define PY_SSIZE_T_CLEAN
#ifdef __linux__
#define _GNU_SOURCE /* sync_file_range, fallocate */
#endif
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "accel.h"

/* --------------------------------------------------------------- functions */


PyObject *
accel_crc32(PyObject *Py_UNUSED(module), PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint32_t crc;
    if (view.len > CRC_GIL_FREE) {
        Py_BEGIN_ALLOW_THREADS
        crc = crc32_of((const unsigned char *)view.buf, view.len);
        Py_END_ALLOW_THREADS
    }
    else
        crc = crc32_of((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

PyObject *
accel_clmul(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(crc32_clmul_in_use());
}

#define MAX_PARTS 8

/* framed(*parts) -> bytes: the parts one after the other, then the CRC-32 of
   them all, little-endian: a log record in one call. */
PyObject *
accel_framed(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > MAX_PARTS) {
        PyErr_Format(PyExc_TypeError, "framed() takes at most %d parts", MAX_PARTS);
        return NULL;
    }
    Py_buffer views[MAX_PARTS];
    Py_ssize_t total = 0, held = 0;
    PyObject *record = NULL;
    for (; held < nargs; held++) {
        if (PyObject_GetBuffer(args[held], &views[held], PyBUF_SIMPLE) < 0)
            goto done;
        if (views[held].len > PY_SSIZE_T_MAX - 4 - total) {
            PyBuffer_Release(&views[held]);
            PyErr_SetString(PyExc_OverflowError, "framed(): parts too large");
            goto done;
        }
        total += views[held].len;
    }
    record = PyBytes_FromStringAndSize(NULL, total + 4);
    if (record == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(record);
    for (Py_ssize_t i = 0; i < nargs; i++) {
        memcpy(out, views[i].buf, (size_t)views[i].len);
        out += views[i].len;
    }
    write_u32(out, crc32_of((const unsigned char *)PyBytes_AS_STRING(record), total));
done:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    return record;
}

/* Write iov[0..nparts), then the CRC-32 of them all, at ``offset`` of ``fd``
   in one pwritev (no copy of the parts), with the GIL released: the parts
   must be buffers that cannot change meanwhile (bytes). Short writes are
   resumed, and so are writes interrupted by a signal once its handler has
   run (as os.pwrite does). Returns the bytes written, or -1 with OSError
   set (and *failed_errno its errno) or the handler's exception set (and
   *failed_errno 0). iov has room for nparts + 1 entries. */
Py_ssize_t
write_frame(int fd, long long offset, struct iovec *iov, int nparts, int *failed_errno)
{
    *failed_errno = 0;
    unsigned char crc_bytes[4];
    Py_ssize_t total = 0;
    for (int i = 0; i < nparts; i++)
        total += (Py_ssize_t)iov[i].iov_len;
    iov[nparts].iov_base = crc_bytes;
    iov[nparts].iov_len = 4;
    struct iovec *next = iov;
    int left = nparts + 1;
    off_t at = (off_t)offset;
    int error = 0, first = 1;
    while (left > 0) {
        Py_BEGIN_ALLOW_THREADS
        if (first) {
            uint32_t crc = 0;
            for (int i = 0; i < nparts; i++)
                crc = crc32_update(crc, (const unsigned char *)iov[i].iov_base,
                                 (Py_ssize_t)iov[i].iov_len);
            write_u32(crc_bytes, crc);
        }
        while (left > 0) {
            ssize_t n = pwritev(fd, next, left, at);
            if (n < 0) {
                error = errno;
                break;
            }
            if (n == 0) {
                error = EIO;
                break;
            }
            at += n;
            while (left > 0 && (size_t)n >= next->iov_len) {
                n -= (ssize_t)next->iov_len;
                next++;
                left--;
            }
            if (left > 0) {
                next->iov_base = (char *)next->iov_base + n;
                next->iov_len -= (size_t)n;
            }
        }
        Py_END_ALLOW_THREADS
        first = 0;
        if (error == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return -1;
            error = 0;
        }
        else if (error) {
            *failed_errno = error;
            errno = error;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return total + 4;
}

/* write_framed(fd, offset, *parts) -> int: write_frame of the parts (bytes). */
PyObject *
accel_write_framed(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 3 || nargs - 2 > MAX_PARTS) {
        PyErr_Format(PyExc_TypeError, "write_framed(fd, offset, *parts): 1 to %d parts",
                     MAX_PARTS);
        return NULL;
    }
    long fd_long = PyLong_AsLong(args[0]);
    if (fd_long == -1 && PyErr_Occurred())
        return NULL;
    if (fd_long < 0 || fd_long > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "write_framed(): bad file descriptor");
        return NULL;
    }
    long long offset = PyLong_AsLongLong(args[1]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "write_framed(): negative offset");
        return NULL;
    }
    Py_ssize_t nparts = nargs - 2;
    struct iovec iov[MAX_PARTS + 1];
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < nparts; i++) {
        PyObject *part = args[2 + i];
        if (!PyBytes_Check(part)) {
            PyErr_Format(PyExc_TypeError, "write_framed(): parts must be bytes, not %.100s",
                         Py_TYPE(part)->tp_name);
            return NULL;
        }
        if (PyBytes_GET_SIZE(part) > PY_SSIZE_T_MAX - 4 - total) {
            PyErr_SetString(PyExc_OverflowError, "write_framed(): parts too large");
            return NULL;
        }
        iov[i].iov_base = PyBytes_AS_STRING(part);
        iov[i].iov_len = (size_t)PyBytes_GET_SIZE(part);
        total += PyBytes_GET_SIZE(part);
    }
    int failed_errno;
    Py_ssize_t written = write_frame((int)fd_long, offset, iov, (int)nparts, &failed_errno);
    return written < 0 ? NULL : PyLong_FromSsize_t(written);
}
