/* What the files of the _accel extension share (accel_module.c is its init;
   see accel.py for what it accelerates): byte helpers, the log's format
   constants (format.h), and each file's entry points. */

#ifndef L2_ACCEL_H
#define L2_ACCEL_H

#include <Python.h>
#include <stdint.h>
#include <sys/uio.h>

#include "crc32.h"
#include "format.h"

/* Checksums longer than this are computed without the GIL (values may be large). */
#define CRC_GIL_FREE ((Py_ssize_t)1 << 16)

/* framing.c: framed records (parts, then their CRC-32) */
L2_INTERNAL PyObject *accel_crc32(PyObject *module, PyObject *data);
L2_INTERNAL PyObject *accel_clmul(PyObject *module, PyObject *ignored);
L2_INTERNAL PyObject *accel_framed(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
L2_INTERNAL PyObject *accel_write_framed(PyObject *module, PyObject *const *args,
                                         Py_ssize_t nargs);
/* Write iov[0 .. nparts) and their CRC-32 at offset in one pwritev (iov has
   room for one more part): the bytes written, or -1 with an OSError set and
   *failed_errno its errno (0 for another error). */
L2_INTERNAL Py_ssize_t write_frame(int fd, long long offset, struct iovec *iov, int nparts,
                                   int *failed_errno);

/* log_writer.c: a log's tail, the index's put, the log's replay */
L2_INTERNAL extern PyTypeObject LogTailType;
L2_INTERNAL extern PyTypeObject WriterType;
L2_INTERNAL PyObject *accel_replay_log(PyObject *module, PyObject *const *args,
                                       Py_ssize_t nargs);

/* values_tail.c: a values file's tail, its checked reads, an indexed file's append */
L2_INTERNAL extern PyTypeObject ValuesTailType;
L2_INTERNAL extern PyTypeObject IndexedAppendType;
L2_INTERNAL PyObject *accel_value_of_record(PyObject *module, PyObject *const *args,
                                            Py_ssize_t nargs);
/* The names IndexedAppend calls (0, or -1 with an error set); once, at init. */
L2_INTERNAL int indexed_append_names(void);

/* lru_cache.c: the indexed files' cache */
L2_INTERNAL extern PyTypeObject LruCacheType;
/* LruCache.put(key, entry) on an LruCache (args[0], args[1]). */
L2_INTERNAL PyObject *lru_cache_put(PyObject *cache, PyObject *const *args, Py_ssize_t nargs);

/* container_decoder.c: a Struct of fixed-size fields, decoded in one call */
L2_INTERNAL extern PyTypeObject ContainerDecoderType;

/* files.c: file-system questions */
L2_INTERNAL PyObject *accel_mappable(PyObject *module, PyObject *arg);
L2_INTERNAL PyObject *accel_reserve(PyObject *module, PyObject *args);

#endif
