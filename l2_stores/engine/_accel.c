/* Optional C accelerator of the data file's hot loops (see accel.py).

   Lookup: the lookup of one key in a mapped data file (see datafile.py for
   the layout): hash the key (CRC-32, as zlib), read its bucket's bounds from
   the fan-out, bisect the bucket's slice of the hash column, then compare
   the key of each row of equal hash, checking the row's checksum every
   time. A bucket whose hash slice has not been verified yet, or whose
   bounds are out of order, is handed back to Python, which checks it and
   raises the store's error; so is a row whose checksum fails. Every read
   is bounds-checked against the buffer, whatever the file says.

   No state is shared between calls but the buffers, which the caller keeps
   alive and unchanged (the data file is read-only once written). */

#define PY_SSIZE_T_CLEAN
#ifdef __linux__
#define _GNU_SOURCE /* sync_file_range, fallocate */
#endif
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/vfs.h>
#endif

#include "csrc/crc32.h"

static inline uint32_t
read_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline uint64_t
read_u64(const unsigned char *p)
{
    return (uint64_t)read_u32(p) | ((uint64_t)read_u32(p + 4) << 32);
}

static inline void
write_u32(unsigned char *p, uint32_t v)
{
    p[0] = v & 0xff;
    p[1] = (v >> 8) & 0xff;
    p[2] = (v >> 16) & 0xff;
    p[3] = v >> 24;
}

static inline void
write_u64(unsigned char *p, uint64_t v)
{
    write_u32(p, (uint32_t)v);
    write_u32(p + 4, (uint32_t)(v >> 32));
}



/* --------------------------------------------------------------- functions */

/* Runs longer than this are checksummed without the GIL (values may be large). */
#define CRC_GIL_FREE ((Py_ssize_t)1 << 16)

static PyObject *
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

static PyObject *
accel_clmul(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(crc32_clmul_in_use());
}

#define MAX_PARTS 8

/* framed(*parts) -> bytes: the parts one after the other, then the CRC-32 of
   them all, little-endian: a log record in one call. */
static PyObject *
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
static Py_ssize_t
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
static PyObject *
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

/* ---- the write path: a log's tail and the index's put ----

   LogTail holds what a log writer's appends change: log.py's LogWriter
   subclasses it, so that its Python paths and the C put below share one
   file descriptor, end offset, record count and pending buffer.

   Writer.put is Index.put for the common add: flushed, no fsync, nothing
   pending, no GC recording keys, bytes of the expected sizes, and room in
   the active log (one that does not fill the buffer; past it, while a
   merge runs, up to the log cap). It works on the state the
   index hands it with set() whenever that changes (the active log, its
   dict, whether a merge runs, whether a GC records keys) and reads no
   attribute of the index: it writes the record, binds the key in the
   dict, and leaves everything else to the index's Python put: the put
   that fills the log (and starts a merge), and one whose write fails
   (which writes again and reports a failure itself). It holds that put as
   a weakref.WeakMethod, so that an index dropped without close() is freed
   at once. */

typedef struct {
    PyObject_HEAD
    int fd;
    char fsync;
    long long end;
    Py_ssize_t records;
    PyObject *pending; /* bytearray, or NULL before LogWriter.__init__ */
    char *map;         /* the file's first map_size bytes, mapped shared, or NULL */
    Py_ssize_t map_size;
} LogTail;

static PyObject *
logtail_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwargs))
{
    LogTail *self = (LogTail *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->fd = -1;
    return (PyObject *)self;
}

static void
logtail_unmap(LogTail *self)
{
    if (self->map != NULL) {
        munmap(self->map, (size_t)self->map_size);
        self->map = NULL;
        self->map_size = 0;
    }
}

/* _map(size): map the file's first ``size`` bytes (which the caller has
   allocated on disk) for the C put to write its records into. */
static PyObject *
logtail_map(LogTail *self, PyObject *arg)
{
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size <= 0 || self->fd < 0 || self->map != NULL) {
        PyErr_SetString(PyExc_ValueError, "_map(size): a positive size, an open and unmapped log");
        return NULL;
    }
    void *map = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, self->fd, 0);
    if (map == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    self->map = map;
    self->map_size = size;
    Py_RETURN_NONE;
}

static PyObject *
logtail_unmap_method(LogTail *self, PyObject *Py_UNUSED(ignored))
{
    logtail_unmap(self);
    Py_RETURN_NONE;
}

static PyObject *
logtail_mapped_size(LogTail *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->map_size);
}

static PyMethodDef logtail_methods[] = {
    {"_map", (PyCFunction)logtail_map, METH_O,
     "_map(size): map the file's first size bytes, allocated on disk, for the C put."},
    {"_unmap", (PyCFunction)logtail_unmap_method, METH_NOARGS,
     "_unmap(): drop the mapping (before the file is cut or closed)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef logtail_getset[] = {
    {"_mapped_size", (getter)logtail_mapped_size, NULL, "bytes mapped for the C put, 0 if none",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static void
logtail_dealloc(LogTail *self)
{
    logtail_unmap(self);
    Py_CLEAR(self->pending);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef logtail_members[] = {
    {"_fd", T_INT, offsetof(LogTail, fd), 0, "the file descriptor, -1 once closed"},
    {"_fsync", T_BOOL, offsetof(LogTail, fsync), 0, "whether every append is fsynced"},
    {"_end", T_LONGLONG, offsetof(LogTail, end), 0, "the offset of the next record"},
    {"records", T_PYSSIZET, offsetof(LogTail, records), 0, "records in the log"},
    {"_pending", T_OBJECT_EX, offsetof(LogTail, pending), 0, "framed records not written yet"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject LogTailType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.LogTail",
    .tp_basicsize = sizeof(LogTail),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A log writer's tail: fd, end offset, record count, pending bytes.",
    .tp_new = logtail_new,
    .tp_dealloc = (destructor)logtail_dealloc,
    .tp_members = logtail_members,
    .tp_methods = logtail_methods,
    .tp_getset = logtail_getset,
};

/* ---- a values file's tail

   ValuesTail holds what an indexed file's values file appends change:
   values.py's ValuesFile subclasses it. Its append(key, value) is the
   common append in one C call: exact bytes of the key's size, a value of
   at most 0xFFFFFFFE bytes, no fsync, and the record within the reserved
   blocks (or no reservation kept): the record ``n | key | value | n |
   crc`` written at ``end`` in one pwritev, ``end`` moved past it, its
   offset returned. Anything else, and any failed write (written again
   there, then cut back and reported), goes to the subclass's Python
   _append_in_python. */

#define MAX_VALUE_LENGTH 0xFFFFFFFEu

typedef struct {
    PyObject_HEAD
    int fd;
    char fsync;
    long long end;
    long long reserved; /* where the reserved blocks end; 0: none kept */
    Py_ssize_t key_size;
    long long number;   /* the file's number, in the index entries */
} ValuesTail;

static PyObject *
valuestail_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwargs))
{
    ValuesTail *self = (ValuesTail *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->fd = -1;
        self->key_size = -1;
    }
    return (PyObject *)self;
}

static PyObject *
valuestail_append(ValuesTail *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "append(key, value) takes 2 arguments");
        return NULL;
    }
    PyObject *key = args[0], *value = args[1];
    long long offset = self->end;
    if (self->fd < 0 || self->fsync || !PyBytes_CheckExact(key) ||
        PyBytes_GET_SIZE(key) != self->key_size || !PyBytes_CheckExact(value) ||
        (size_t)PyBytes_GET_SIZE(value) > MAX_VALUE_LENGTH || offset < 0)
        return PyObject_CallMethod((PyObject *)self, "_append_in_python", "OO", key, value);
    Py_ssize_t length = PyBytes_GET_SIZE(value);
    long long record_end = offset + 12 + self->key_size + length;
    if (self->reserved > 0 && record_end > self->reserved)
        return PyObject_CallMethod((PyObject *)self, "_append_in_python", "OO", key, value);
    unsigned char length_bytes[4];
    write_u32(length_bytes, (uint32_t)length);
    struct iovec iov[5] = {
        {length_bytes, 4},
        {PyBytes_AS_STRING(key), (size_t)self->key_size},
        {PyBytes_AS_STRING(value), (size_t)length},
        {length_bytes, 4},
    };
    int failed_errno;
    Py_ssize_t written = write_frame(self->fd, offset, iov, 4, &failed_errno);
    if (written < 0) {
        if (failed_errno == 0)
            return NULL; /* a signal handler's exception */
        PyErr_Clear();
        return PyObject_CallMethod((PyObject *)self, "_append_in_python", "OO", key, value);
    }
    self->end = offset + written;
    return PyLong_FromLongLong(offset);
}

/* append_entry(key, value, header) -> bytes: append, then the index entry
   that points at the record (values.py's POINTER, then the header). */
static PyObject *
valuestail_append_entry(ValuesTail *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "append_entry(key, value, header) takes 3 arguments");
        return NULL;
    }
    PyObject *value = args[1], *header = args[2];
    if (!PyBytes_CheckExact(value) || !PyBytes_CheckExact(header) || self->number < 0 ||
        self->number > 0xFFFFFFFFLL)
        return PyObject_CallMethod((PyObject *)self, "_append_entry_in_python", "OOO", args[0],
                                   value, header);
    PyObject *offset_object = valuestail_append(self, args, 2);
    if (offset_object == NULL)
        return NULL;
    long long offset = PyLong_AsLongLong(offset_object);
    Py_DECREF(offset_object);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t header_size = PyBytes_GET_SIZE(header);
    PyObject *entry = PyBytes_FromStringAndSize(NULL, 16 + header_size);
    if (entry == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(entry);
    write_u64(p, (uint64_t)offset);
    write_u32(p + 8, (uint32_t)PyBytes_GET_SIZE(value));
    write_u32(p + 12, (uint32_t)self->number);
    memcpy(p + 16, PyBytes_AS_STRING(header), (size_t)header_size);
    return entry;
}

static PyMethodDef valuestail_methods[] = {
    {"append", (PyCFunction)(void (*)(void))valuestail_append, METH_FASTCALL,
     "append(key, value) -> int: write a record at the end; its offset."},
    {"append_entry", (PyCFunction)(void (*)(void))valuestail_append_entry, METH_FASTCALL,
     "append_entry(key, value, header) -> bytes: append; the index entry pointing at it."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef valuestail_members[] = {
    {"_fd", T_INT, offsetof(ValuesTail, fd), 0, "the file descriptor, -1 when none"},
    {"_fsync", T_BOOL, offsetof(ValuesTail, fsync), 0, "whether every append is fsynced"},
    {"end", T_LONGLONG, offsetof(ValuesTail, end), 0, "the offset of the next record"},
    {"_reserved", T_LONGLONG, offsetof(ValuesTail, reserved), 0,
     "where the reserved blocks end; 0 when none are kept"},
    {"_key_size", T_PYSSIZET, offsetof(ValuesTail, key_size), 0, "the keys' size"},
    {"number", T_LONGLONG, offsetof(ValuesTail, number), 0, "the file's number"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ValuesTailType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.ValuesTail",
    .tp_basicsize = sizeof(ValuesTail),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A values file's tail: fd, end offset, reserved end; the common append in C.",
    .tp_new = valuestail_new,
    .tp_methods = valuestail_methods,
    .tp_members = valuestail_members,
};

typedef struct {
    PyObject_HEAD
    /* the state the index hands over with set() whenever it changes */
    PyObject *log;    /* the active log (a LogTail), or None */
    PyObject *active; /* its dict */
    int merging;      /* a merge runs: the log may grow past the buffer */
    int recording;    /* a GC records written keys: every put is Python's */
    /* the index's Python put, as a weakref.WeakMethod (see below) */
    PyObject *put_in_python;
    Py_ssize_t buffer_size;
    Py_ssize_t log_cap;
    Py_ssize_t key_size;
    Py_ssize_t value_size;
} Writer;

static const char op_set = 1;

static int
writer_init(Writer *self, PyObject *args, PyObject *kwargs)
{
    PyObject *put_in_python;
    Py_ssize_t buffer_size, log_cap, key_size, value_size;
    static char *names[] = {"put_in_python", "buffer_size", "log_cap", "key_size", "value_size",
                            NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Onnnn:Writer", names, &put_in_python,
                                     &buffer_size, &log_cap, &key_size, &value_size))
        return -1;
    if (buffer_size < 1 || log_cap < buffer_size || key_size < 0 || value_size < 0) {
        PyErr_SetString(PyExc_ValueError, "Writer: bad buffer, cap, key or value size");
        return -1;
    }
    if (!PyCallable_Check(put_in_python)) {
        PyErr_SetString(PyExc_TypeError, "Writer: put_in_python must be callable");
        return -1;
    }
    if (self->put_in_python != NULL) {
        PyErr_SetString(PyExc_TypeError, "Writer: already initialized");
        return -1;
    }
    self->put_in_python = Py_NewRef(put_in_python);
    self->log = Py_NewRef(Py_None);
    self->active = PyDict_New();
    if (self->active == NULL)
        return -1;
    self->buffer_size = buffer_size;
    self->log_cap = log_cap;
    self->key_size = key_size;
    self->value_size = value_size;
    return 0;
}

static int
writer_traverse(Writer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->log);
    Py_VISIT(self->active);
    Py_VISIT(self->put_in_python);
    return 0;
}

static int
writer_clear(Writer *self)
{
    Py_CLEAR(self->log);
    Py_CLEAR(self->active);
    Py_CLEAR(self->put_in_python);
    return 0;
}

static void
writer_dealloc(Writer *self)
{
    PyObject_GC_UnTrack(self);
    writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
writer_set(Writer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "set(log, active, merging, recording, /)");
        return NULL;
    }
    PyObject *log = args[0], *active = args[1];
    if (log != Py_None && !PyObject_TypeCheck(log, &LogTailType)) {
        PyErr_SetString(PyExc_TypeError, "Writer.set: log is a LogTail or None");
        return NULL;
    }
    if (!PyDict_CheckExact(active)) {
        PyErr_SetString(PyExc_TypeError, "Writer.set: active is a dict");
        return NULL;
    }
    int merging = PyObject_IsTrue(args[2]);
    int recording = PyObject_IsTrue(args[3]);
    if (merging < 0 || recording < 0)
        return NULL;
    Py_SETREF(self->log, Py_NewRef(log));
    Py_SETREF(self->active, Py_NewRef(active));
    self->merging = merging;
    self->recording = recording;
    Py_RETURN_NONE;
}

/* The common put, or 0 when it is not one (nothing changed, no exception
   set): then the index's Python put decides. The put that fills the buffer
   (which starts a merge) is always Python's, and so is one whose write
   fails: it writes again, and reports a failure as it does. */
static int
writer_put_fast(Writer *self, PyObject *key, PyObject *value)
{
    if (self->recording || self->log == Py_None || !PyBytes_CheckExact(key) ||
        !PyBytes_CheckExact(value) || PyBytes_GET_SIZE(key) != self->key_size ||
        PyBytes_GET_SIZE(value) != self->value_size)
        return 0;
    LogTail *tail = (LogTail *)self->log;
    /* below the buffer, not filling it; or while a merge runs, below the cap */
    int room = self->merging ? tail->records < self->log_cap
                             : tail->records + 1 < self->buffer_size;
    if (!room || tail->fsync || tail->fd < 0 || tail->pending == NULL ||
        !PyByteArray_CheckExact(tail->pending) || PyByteArray_GET_SIZE(tail->pending) != 0)
        return 0;
    Py_ssize_t record_size = 1 + self->key_size + self->value_size + 4;
    if (tail->map != NULL && tail->end >= 0 && tail->end < tail->map_size - record_size) {
        /* A store into the shared mapping is in the page cache, as a
           write's bytes are: it survives the process. A kill halfway
           leaves a record that fails its checksum with zeros after it, at
           least one byte (hence the strict bound), which a reader takes for
           a torn record (log.py). */
        unsigned char *at = (unsigned char *)tail->map + tail->end;
        at[0] = (unsigned char)op_set;
        memcpy(at + 1, PyBytes_AS_STRING(key), (size_t)self->key_size);
        memcpy(at + 1 + self->key_size, PyBytes_AS_STRING(value), (size_t)self->value_size);
        write_u32(at + record_size - 4, crc32_of(at, record_size - 4));
    }
    else {
        struct iovec iov[4];
        iov[0].iov_base = (void *)&op_set;
        iov[0].iov_len = 1;
        iov[1].iov_base = PyBytes_AS_STRING(key);
        iov[1].iov_len = (size_t)self->key_size;
        iov[2].iov_base = PyBytes_AS_STRING(value);
        iov[2].iov_len = (size_t)self->value_size;
        int failed_errno;
        Py_ssize_t written = write_frame(tail->fd, tail->end, iov, 3, &failed_errno);
        if (written < 0) {
            PyErr_Clear();
            return 0;
        }
        record_size = written;
    }
    /* the record is in place: count it, then bind */
    tail->end += record_size;
    tail->records += 1;
    return PyDict_SetItem(self->active, key, value) < 0 ? -1 : 1;
}

static PyObject *
writer_put(Writer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw != 3 || nargs < 2 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "flush"))) {
        PyErr_SetString(PyExc_TypeError, "put(key, value, flush) takes 3 arguments");
        return NULL;
    }
    PyObject *key = args[0], *value = args[1], *flush = args[2];
    int flushed = PyObject_IsTrue(flush);
    if (flushed < 0)
        return NULL;
    if (self->put_in_python == NULL) {
        PyErr_SetString(PyExc_TypeError, "Writer: not initialized");
        return NULL;
    }
    if (flushed) {
        int put = writer_put_fast(self, key, value);
        if (put < 0)
            return NULL;
        if (put)
            Py_RETURN_NONE;
    }
    /* the index's Python put: a WeakMethod gives the bound method (or None
       once the index is gone, which holds the writer, not the other way) */
    PyObject *method = PyObject_CallNoArgs(self->put_in_python);
    if (method == NULL)
        return NULL;
    if (method == Py_None) {
        Py_DECREF(method);
        PyErr_SetString(PyExc_ReferenceError, "Writer: its index is gone");
        return NULL;
    }
    PyObject *call[3] = {key, value, flush};
    PyObject *result = PyObject_Vectorcall(method, call, 3, NULL);
    Py_DECREF(method);
    return result;
}

static PyMethodDef writer_methods[] = {
    {"put", (PyCFunction)(void (*)(void))writer_put, METH_FASTCALL | METH_KEYWORDS,
     "put(key, value, flush): Index.put, the common case in C."},
    {"set", (PyCFunction)(void (*)(void))writer_set, METH_FASTCALL,
     "set(log, active, merging, recording, /): the index's put state, whenever it changes."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Writer(put_in_python, buffer_size, log_cap, key_size, value_size): an index's put\n"
              "in C, on the state the index hands it with set().",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)writer_init,
    .tp_traverse = (traverseproc)writer_traverse,
    .tp_clear = (inquiry)writer_clear,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_methods = writer_methods,
};

/* CRC-32 of a record followed by its own CRC (little-endian): framing.CRC_RESIDUE. */
#define CRC_RESIDUE 0x2144DF1Cu

/* value_of_record(buffer, offset, length, key) -> bytes | None: the value of
   the values-file record at ``offset`` (see values.py: n, key, value, n,
   crc), when the record lies inside the buffer, its length is ``length``,
   its key is ``key`` and its checksum holds; else None. */
static PyObject *
accel_value_of_record(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "value_of_record(buffer, offset, length, key)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t length = PyLong_AsSsize_t(args[2]);
    if (length == -1 && PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "value_of_record(): key must be bytes");
        return NULL;
    }
    const char *key = PyBytes_AS_STRING(args[3]);
    Py_ssize_t key_size = PyBytes_GET_SIZE(args[3]);
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t size = 12 + key_size + length;
    const unsigned char *record = NULL;
    if (offset >= 0 && length >= 0 && length <= 0xFFFFFFFEL && offset <= view.len &&
        size <= view.len - offset)
        record = (const unsigned char *)view.buf + offset;
    if (record == NULL || read_u32(record) != (uint32_t)length ||
        memcmp(record + 4, key, (size_t)key_size) != 0) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    uint32_t residue;
    if (size > CRC_GIL_FREE) {
        Py_BEGIN_ALLOW_THREADS
        residue = crc32_of(record, size);
        Py_END_ALLOW_THREADS
    }
    else
        residue = crc32_of(record, size);
    if (residue != CRC_RESIDUE) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    result = PyBytes_FromStringAndSize((const char *)record + 4 + key_size, length);
done:
    PyBuffer_Release(&view);
    return result;
}

/* replay_log(buffer, key_size, value_size, bindings) -> (position, synced_at, sealed):
   put the complete log records of buffer (op, key, value, CRC-32) into
   bindings, a set (op 1) as key -> value and a remove (op 2) as key -> None,
   in order; marks (op 3) and seals (op 4) bind nothing. Bit 7 of the op
   byte is the SYNCED flag. Stop at the first record whose checksum or op
   fails, or after a seal; return where it stopped, the position of the
   last record with the SYNCED flag or a mark (-1: none), and whether it
   stopped after a seal. (log.py's _replay_in_python is the same loop.) */
#define LOG_OP_SET 1
#define LOG_OP_REMOVE 2
#define LOG_OP_MARK 3
#define LOG_OP_SEAL 4
#define LOG_SYNCED 0x80
#define LOG_OP_MASK 0x7F

static PyObject *
accel_replay_log(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "replay_log(buffer, key_size, value_size, bindings)");
        return NULL;
    }
    Py_ssize_t key_size = PyLong_AsSsize_t(args[1]);
    if (key_size == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t value_size = PyLong_AsSsize_t(args[2]);
    if (value_size == -1 && PyErr_Occurred())
        return NULL;
    PyObject *bindings = args[3];
    if (key_size < 0 || value_size < 0 || key_size > (1 << 20) || value_size > (1 << 20) ||
        !PyDict_Check(bindings)) {
        PyErr_SetString(PyExc_ValueError, "replay_log: bad sizes, or bindings not a dict");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *base = (const unsigned char *)view.buf;
    Py_ssize_t size = 1 + key_size + value_size + 4;
    Py_ssize_t complete = view.len - view.len % size, position = 0, synced_at = -1;
    int sealed = 0;
    while (position < complete) {
        const unsigned char *record = base + position;
        int op = record[0] & LOG_OP_MASK;
        if (op < LOG_OP_SET || op > LOG_OP_SEAL ||
            crc32_of(record, size - 4) != read_u32(record + size - 4))
            break;
        if (op <= LOG_OP_REMOVE) {
            PyObject *key = PyBytes_FromStringAndSize((const char *)record + 1, key_size);
            PyObject *value = op == LOG_OP_SET ? PyBytes_FromStringAndSize(
                                                     (const char *)record + 1 + key_size, value_size)
                                               : Py_NewRef(Py_None);
            int failed = key == NULL || value == NULL || PyDict_SetItem(bindings, key, value) < 0;
            Py_XDECREF(key);
            Py_XDECREF(value);
            if (failed) {
                PyBuffer_Release(&view);
                return NULL;
            }
        }
        if ((record[0] & LOG_SYNCED) || op == LOG_OP_MARK)
            synced_at = position;
        position += size;
        if (op == LOG_OP_SEAL) {
            sealed = 1;
            break;
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nnO)", position, synced_at, sealed ? Py_True : Py_False);
}

/* ---------------------------------------------------------------- LruCache */

/* The indexed files' cache of recently read or appended (value, header)
   pairs: a dict from key to slot number, and per slot the key, the entry,
   its weight and its neighbours in a list from the newest to the oldest.
   It keeps at most `capacity` entries weighing at most `max_bytes` in all;
   an entry's weight is the length of the bytes in it (an entry is a tuple
   of bytes), and an entry heavier than max_bytes is not kept at all. The
   list and the dict change together inside one call, which holds the GIL
   and runs no Python code (keys are exact bytes), so readers need no lock.
   A reference dropped by a call is released only once the cache is
   consistent again. */

typedef struct {
    PyObject_HEAD
    PyObject *slots;   /* dict: key -> slot number (int) */
    PyObject **keys;   /* per slot */
    PyObject **entries;
    Py_ssize_t *weights;
    Py_ssize_t *newer; /* per slot: the next newer slot, or -1 */
    Py_ssize_t *older; /* per slot: the next older slot, or -1; free slots: the next free */
    Py_ssize_t newest, oldest, free, used, filled, allocated, capacity;
    Py_ssize_t max_bytes;
    /* At most max_bytes, plus one entry's weight (at most max_bytes) for
       the length of a put: unsigned, it cannot overflow. */
    unsigned long long bytes;
} LruCache;

/* The arrays grow with use (doubling, up to the capacity), so a large
   capacity costs nothing until it is filled. Slots below `filled` are in
   the list or in the free chain. */
#define LRU_FIRST_ALLOCATION 64

static void
lru_unlink(LruCache *self, Py_ssize_t slot)
{
    Py_ssize_t newer = self->newer[slot], older = self->older[slot];
    if (newer >= 0)
        self->older[newer] = older;
    else
        self->newest = older;
    if (older >= 0)
        self->newer[older] = newer;
    else
        self->oldest = newer;
}

static void
lru_push_newest(LruCache *self, Py_ssize_t slot)
{
    self->newer[slot] = -1;
    self->older[slot] = self->newest;
    if (self->newest >= 0)
        self->newer[self->newest] = slot;
    else
        self->oldest = slot;
    self->newest = slot;
}

static void
lru_touch(LruCache *self, Py_ssize_t slot)
{
    if (self->newest != slot) {
        lru_unlink(self, slot);
        lru_push_newest(self, slot);
    }
}

/* Room for one more slot; -1 with MemoryError (nothing changed) if none. */
static int
lru_grow(LruCache *self)
{
    if (self->free >= 0 || self->filled < self->allocated)
        return 0;
    Py_ssize_t size = self->allocated ? 2 * self->allocated : LRU_FIRST_ALLOCATION;
    if (size > self->capacity || size < 0)
        size = self->capacity;
    /* Each array is replaced only once its copy exists: a failure leaves
       the cache as it was (arrays longer than needed are harmless). */
    PyObject **keys = PyMem_Realloc(self->keys, (size_t)size * sizeof(PyObject *));
    if (keys == NULL)
        goto no_memory;
    self->keys = keys;
    PyObject **entries = PyMem_Realloc(self->entries, (size_t)size * sizeof(PyObject *));
    if (entries == NULL)
        goto no_memory;
    self->entries = entries;
    Py_ssize_t *weights = PyMem_Realloc(self->weights, (size_t)size * sizeof(Py_ssize_t));
    if (weights == NULL)
        goto no_memory;
    self->weights = weights;
    Py_ssize_t *newer = PyMem_Realloc(self->newer, (size_t)size * sizeof(Py_ssize_t));
    if (newer == NULL)
        goto no_memory;
    self->newer = newer;
    Py_ssize_t *older = PyMem_Realloc(self->older, (size_t)size * sizeof(Py_ssize_t));
    if (older == NULL)
        goto no_memory;
    self->older = older;
    self->allocated = size;
    return 0;
no_memory:
    PyErr_NoMemory();
    return -1;
}

/* A free slot, after lru_grow made room. */
static Py_ssize_t
lru_take_slot(LruCache *self)
{
    Py_ssize_t slot = self->free;
    if (slot >= 0) {
        self->free = self->older[slot];
        return slot;
    }
    return self->filled++;
}

static void
lru_release_slot(LruCache *self, Py_ssize_t slot)
{
    self->older[slot] = self->free;
    self->free = slot;
}

/* Take slot out of the list, the dict and the weight; its key and entry
   are left to the caller to release. The dict deletion cannot fail: the
   key is there and is exact bytes (its hash and comparison cannot fail). */
static int
lru_detach(LruCache *self, Py_ssize_t slot)
{
    if (PyDict_DelItem(self->slots, self->keys[slot]) < 0)
        return -1;
    lru_unlink(self, slot);
    self->bytes -= (unsigned long long)self->weights[slot];
    self->used--;
    lru_release_slot(self, slot);
    return 0;
}

/* Drop the oldest entries until the weight fits; -1 on error. Each is
   released with the cache consistent, so what its release runs may use it. */
static int
lru_fit(LruCache *self)
{
    while (self->bytes > (unsigned long long)self->max_bytes && self->oldest >= 0) {
        Py_ssize_t slot = self->oldest;
        PyObject *key = self->keys[slot], *entry = self->entries[slot];
        if (lru_detach(self, slot) < 0)
            return -1;
        Py_DECREF(key);
        Py_DECREF(entry);
    }
    return 0;
}

/* The weight of an entry: the length of the bytes in it (at most
   PY_SSIZE_T_MAX, where the same bytes are in it many times). */
static Py_ssize_t
lru_weight(PyObject *entry)
{
    if (PyBytes_Check(entry))
        return PyBytes_GET_SIZE(entry);
    if (!PyTuple_Check(entry))
        return 0;
    Py_ssize_t weight = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(entry); i++) {
        PyObject *item = PyTuple_GET_ITEM(entry, i);
        if (PyBytes_Check(item))
            weight = PyBytes_GET_SIZE(item) > PY_SSIZE_T_MAX - weight
                         ? PY_SSIZE_T_MAX
                         : weight + PyBytes_GET_SIZE(item);
    }
    return weight;
}

static int
lru_init(LruCache *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"capacity", "max_bytes", NULL};
    Py_ssize_t capacity, max_bytes = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|n:LruCache", names, &capacity, &max_bytes))
        return -1;
    if (capacity < 0) {
        PyErr_Format(PyExc_ValueError, "cache capacity must be at least 0, got %zd", capacity);
        return -1;
    }
    if (max_bytes < 0) {
        PyErr_Format(PyExc_ValueError, "cache max_bytes must be at least 0, got %zd", max_bytes);
        return -1;
    }
    if (self->slots != NULL) {
        PyErr_SetString(PyExc_TypeError, "LruCache is initialised once");
        return -1;
    }
    self->slots = PyDict_New();
    if (self->slots == NULL)
        return -1;
    self->newest = self->oldest = self->free = -1;
    self->capacity = capacity;
    self->max_bytes = max_bytes;
    return 0;
}

static int
lru_traverse(LruCache *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slots);
    /* Counted, not only linked: a cache whose __init__ failed has no list. */
    Py_ssize_t slot = self->newest;
    for (Py_ssize_t left = self->used; left > 0; left--, slot = self->older[slot])
        Py_VISIT(self->entries[slot]);
    return 0;
}

/* Empty the cache; cannot fail. The arrays are detached first and their
   references dropped last, so code run by a deallocation sees an empty,
   consistent cache. */
static void
lru_empty(LruCache *self)
{
    PyObject **keys = self->keys, **entries = self->entries;
    Py_ssize_t *older = self->older, slot = self->newest, left = self->used;
    PyMem_Free(self->newer);
    PyMem_Free(self->weights);
    self->keys = self->entries = NULL;
    self->newer = self->older = self->weights = NULL;
    self->used = self->filled = self->allocated = 0;
    self->bytes = 0;
    self->newest = self->oldest = self->free = -1;
    if (self->slots != NULL)
        PyDict_Clear(self->slots);
    for (; left > 0; left--, slot = older[slot]) {
        Py_DECREF(keys[slot]);
        Py_DECREF(entries[slot]);
    }
    PyMem_Free(older);
    PyMem_Free(keys);
    PyMem_Free(entries);
}

static int
lru_clear_references(LruCache *self)
{
    lru_empty(self);
    Py_CLEAR(self->slots);
    return 0;
}

static void
lru_dealloc(LruCache *self)
{
    PyObject_GC_UnTrack(self);
    lru_clear_references(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
lru_ready(LruCache *self)
{
    if (self->slots == NULL) {
        PyErr_SetString(PyExc_ValueError, "LruCache is not initialised");
        return 0;
    }
    return 1;
}

/* The slot of key, -1 if absent, -2 on error. */
static Py_ssize_t
lru_slot_of(LruCache *self, PyObject *key)
{
    if (!PyBytes_CheckExact(key)) {
        PyErr_Format(PyExc_TypeError, "LruCache keys are bytes, got %.100s",
                     Py_TYPE(key)->tp_name);
        return -2;
    }
    PyObject *slot = PyDict_GetItemWithError(self->slots, key);
    if (slot == NULL)
        return PyErr_Occurred() ? -2 : -1;
    return PyLong_AsSsize_t(slot);
}

static PyObject *
lru_get(LruCache *self, PyObject *key)
{
    if (!lru_ready(self))
        return NULL;
    Py_ssize_t slot = lru_slot_of(self, key);
    if (slot == -2)
        return NULL;
    if (slot < 0)
        Py_RETURN_NONE;
    lru_touch(self, slot);
    return Py_NewRef(self->entries[slot]);
}

static PyObject *
lru_put(LruCache *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "LruCache.put(key, entry) takes 2 arguments");
        return NULL;
    }
    if (!lru_ready(self))
        return NULL;
    PyObject *key = args[0], *entry = args[1];
    Py_ssize_t slot = lru_slot_of(self, key);
    if (slot == -2)
        return NULL;
    Py_ssize_t weight = lru_weight(entry);
    int kept = self->capacity > 0 && weight <= self->max_bytes;
    if (slot >= 0 && !kept) { /* the cached entry is stale, and its successor is not kept */
        PyObject *old_key = self->keys[slot], *old_entry = self->entries[slot];
        if (lru_detach(self, slot) < 0)
            return NULL;
        Py_DECREF(old_key);
        Py_DECREF(old_entry);
        Py_RETURN_NONE;
    }
    if (slot >= 0) { /* a newer entry for a cached key */
        PyObject *old_entry = self->entries[slot];
        self->entries[slot] = Py_NewRef(entry);
        self->bytes += (unsigned long long)weight;
        self->bytes -= (unsigned long long)self->weights[slot];
        self->weights[slot] = weight;
        lru_touch(self, slot);
        Py_DECREF(old_entry);
        if (lru_fit(self) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    if (!kept)
        Py_RETURN_NONE;
    PyObject *old_key = NULL, *old_entry = NULL;
    if (self->used == self->capacity) { /* evict the oldest; released at the end */
        old_key = self->keys[self->oldest];
        old_entry = self->entries[self->oldest];
        if (lru_detach(self, self->oldest) < 0)
            return NULL;
    } else if (lru_grow(self) < 0) {
        return NULL;
    }
    slot = lru_take_slot(self);
    PyObject *number = PyLong_FromSsize_t(slot);
    int failed = number == NULL || PyDict_SetItem(self->slots, key, number) < 0;
    Py_XDECREF(number);
    if (failed) {
        lru_release_slot(self, slot);
    } else {
        self->keys[slot] = Py_NewRef(key);
        self->entries[slot] = Py_NewRef(entry);
        self->weights[slot] = weight;
        self->bytes += (unsigned long long)weight;
        self->used++;
        lru_push_newest(self, slot);
    }
    Py_XDECREF(old_key);
    Py_XDECREF(old_entry);
    if (failed || lru_fit(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
lru_clear_method(LruCache *self, PyObject *Py_UNUSED(ignored))
{
    if (!lru_ready(self))
        return NULL;
    lru_empty(self);
    Py_RETURN_NONE;
}

static PyObject *
lru_keys(LruCache *self, PyObject *Py_UNUSED(ignored))
{
    if (!lru_ready(self))
        return NULL;
    PyObject *keys = PyList_New(0);
    if (keys == NULL)
        return NULL;
    for (Py_ssize_t slot = self->oldest; slot >= 0; slot = self->newer[slot]) {
        if (PyList_Append(keys, self->keys[slot]) < 0) {
            Py_DECREF(keys);
            return NULL;
        }
    }
    return keys;
}

static Py_ssize_t
lru_length(LruCache *self)
{
    return self->used;
}

static PyMethodDef lru_methods[] = {
    {"get", (PyCFunction)lru_get, METH_O,
     "get(key) -> entry | None: the cached entry of key, now the newest."},
    {"put", (PyCFunction)(void (*)(void))lru_put, METH_FASTCALL,
     "put(key, entry): cache entry as the newest; the oldest go past the limits."},
    {"clear", (PyCFunction)lru_clear_method, METH_NOARGS, "clear(): drop every entry."},
    {"keys", (PyCFunction)lru_keys, METH_NOARGS, "keys() -> list: the cached keys, oldest first."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef lru_members[] = {
    {"capacity", T_PYSSIZET, offsetof(LruCache, capacity), READONLY,
     "The most entries kept."},
    {"max_bytes", T_PYSSIZET, offsetof(LruCache, max_bytes), READONLY,
     "The most bytes kept, all entries together."},
    {"used_bytes", T_ULONGLONG, offsetof(LruCache, bytes), READONLY,
     "The bytes kept now."},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods lru_as_sequence = {
    .sq_length = (lenfunc)lru_length,
};

static PyTypeObject LruCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.LruCache",
    .tp_basicsize = sizeof(LruCache),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "LruCache(capacity, max_bytes=sys.maxsize): the newest entries put or got, by "
              "bytes key, at most capacity of them and max_bytes of bytes in all.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lru_init,
    .tp_traverse = (traverseproc)lru_traverse,
    .tp_clear = (inquiry)lru_clear_references,
    .tp_dealloc = (destructor)lru_dealloc,
    .tp_methods = lru_methods,
    .tp_members = lru_members,
    .tp_as_sequence = &lru_as_sequence,
};

/* ----------------------------------------------------------- IndexedAppend */

/* IndexedAppend(values, put, cache)(key, value, header): the body of an
   indexed file's append for encoded bytes, in one call: the record and its
   index entry from values.target.append_entry, put(key, entry, True), and
   the pair cached. It runs inside the writer's exclusive section (the
   caller's: see _idle_core's ExclusiveWrite). Errors propagate as the
   Python body lets them. */

typedef struct {
    PyObject_HEAD
    PyObject *values; /* ValueFiles: its target is read at every call */
    PyObject *put;    /* the index's put */
    PyObject *cache;  /* the LRU cache */
    vectorcallfunc vectorcall;
} IndexedAppend;

static PyObject *str_target, *str_append_entry, *str_put;

static PyObject *
iappend_call(IndexedAppend *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (self->values == NULL) {
        PyErr_SetString(PyExc_TypeError, "IndexedAppend: not initialized");
        return NULL;
    }
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "IndexedAppend(key, value, header)");
        return NULL;
    }
    PyObject *target = PyObject_GetAttr(self->values, str_target);
    if (target == NULL)
        return NULL;
    /* Through the method, as the Python body calls it (an instance may
       have it replaced). */
    PyObject *call[4] = {target, args[0], args[1], args[2]};
    PyObject *entry = PyObject_VectorcallMethod(str_append_entry, call, 4, NULL);
    Py_DECREF(target);
    if (entry == NULL)
        return NULL;
    PyObject *put_args[3] = {args[0], entry, Py_True};
    PyObject *done = PyObject_Vectorcall(self->put, put_args, 3, NULL);
    Py_DECREF(entry);
    if (done == NULL)
        return NULL;
    Py_DECREF(done);
    PyObject *pair = PyTuple_Pack(2, args[1], args[2]);
    if (pair == NULL)
        return NULL;
    PyObject *cache_args[3] = {self->cache, args[0], pair};
    if (Py_IS_TYPE(self->cache, &LruCacheType))
        done = lru_put((LruCache *)self->cache, cache_args + 1, 2);
    else
        done = PyObject_VectorcallMethod(str_put, cache_args, 3, NULL);
    Py_DECREF(pair);
    if (done == NULL)
        return NULL;
    Py_DECREF(done);
    Py_RETURN_NONE;
}

static int
iappend_init(IndexedAppend *self, PyObject *args, PyObject *kwargs)
{
    PyObject *values, *put, *cache;
    if (kwargs != NULL || !PyArg_ParseTuple(args, "OOO:IndexedAppend", &values, &put, &cache))
        return -1;
    if (self->values != NULL) {
        PyErr_SetString(PyExc_TypeError, "IndexedAppend: already initialized");
        return -1;
    }
    if (!PyCallable_Check(put)) {
        PyErr_SetString(PyExc_TypeError, "IndexedAppend: put must be callable");
        return -1;
    }
    self->values = Py_NewRef(values);
    self->put = Py_NewRef(put);
    self->cache = Py_NewRef(cache);
    self->vectorcall = (vectorcallfunc)iappend_call;
    return 0;
}

static int
iappend_traverse(IndexedAppend *self, visitproc visit, void *arg)
{
    Py_VISIT(self->values);
    Py_VISIT(self->put);
    Py_VISIT(self->cache);
    return 0;
}

static int
iappend_clear(IndexedAppend *self)
{
    Py_CLEAR(self->values);
    Py_CLEAR(self->put);
    Py_CLEAR(self->cache);
    return 0;
}

static void
iappend_dealloc(IndexedAppend *self)
{
    PyObject_GC_UnTrack(self);
    iappend_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject IndexedAppendType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.IndexedAppend",
    .tp_doc = "IndexedAppend(values, put, cache)(key, value, header): an indexed file's append\n"
              "of encoded bytes: values.target.append_entry, put(key, entry, True), cache.put.",
    .tp_basicsize = sizeof(IndexedAppend),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)iappend_init,
    .tp_dealloc = (destructor)iappend_dealloc,
    .tp_traverse = (traverseproc)iappend_traverse,
    .tp_clear = (inquiry)iappend_clear,
    .tp_vectorcall_offset = offsetof(IndexedAppend, vectorcall),
    .tp_call = PyVectorcall_Call,
};

/* ---------------------------------------------------------- ContainerDecoder */

/* decode(data) of a codec for a construct Struct of fixed-size fields: the
   fields unpacked, set by name into a new construct Container (a dict
   subclass whose item assignment is the dict's). Given the struct format
   (one byte order, then integer, float and "Ns" codes at standard sizes),
   exact bytes of its size are read field by field here, as struct reads
   them; anything else goes through the struct's unpack. Any failure of
   the unpacking is handed to the Python decode, which raises the codec's
   error. */

#define CDEC_MAX_FIELDS 64

typedef struct {
    char code;          /* a struct format code: bBhHlLqQefd, or 's' */
    char little;        /* byte order */
    Py_ssize_t offset, size;
} CdecField;

typedef struct {
    PyObject_HEAD
    PyObject *unpack;    /* struct.Struct(...).unpack */
    PyObject *container; /* construct.Container */
    PyObject *names;     /* tuple of field names */
    PyObject *fallback;  /* the Python decode */
    Py_ssize_t size;     /* bytes of the fields read here; -1: unpack does it */
    CdecField fields[CDEC_MAX_FIELDS];
} ContainerDecoder;

/* Fill self->fields from fmt; self->size stays -1 when fmt is not one
   read here (then unpack is used). */
static void
cdec_read_format(ContainerDecoder *self, const char *fmt, Py_ssize_t count)
{
    self->size = -1;
    const int native_little = PY_LITTLE_ENDIAN;
    char little;
    switch (*fmt++) {
    case '<': little = 1; break;
    case '>': case '!': little = 0; break;
    case '=': little = (char)native_little; break;
    default: return;
    }
    Py_ssize_t offset = 0, field = 0;
    while (*fmt) {
        Py_ssize_t size;
        char code = *fmt;
        if (code >= '0' && code <= '9') {
            Py_ssize_t length = 0;
            while (*fmt >= '0' && *fmt <= '9') {
                length = length * 10 + (*fmt++ - '0');
                if (length > (1 << 24))
                    return;
            }
            if (*fmt != 's')
                return;
            code = 's';
            size = length;
        } else {
            switch (code) {
            case 'b': case 'B': size = 1; break;
            case 'h': case 'H': case 'e': size = 2; break;
            case 'l': case 'L': case 'i': case 'I': case 'f': size = 4; break;
            case 'q': case 'Q': case 'd': size = 8; break;
            default: return;
            }
        }
        fmt++;
        if (field == CDEC_MAX_FIELDS)
            return;
        self->fields[field].code = code;
        self->fields[field].little = little;
        self->fields[field].offset = offset;
        self->fields[field].size = size;
        offset += size;
        field++;
    }
    if (field == count)
        self->size = offset;
}

static int
cdec_init(ContainerDecoder *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"unpack", "container", "names", "fallback", "format", NULL};
    PyObject *unpack, *container, *fields, *fallback;
    const char *format = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO!O|z:ContainerDecoder", names, &unpack,
                                     &container, &PyTuple_Type, &fields, &fallback, &format))
        return -1;
    if (!PyCallable_Check(unpack) || !PyCallable_Check(fallback) || !PyType_Check(container) ||
        !PyType_IsSubtype((PyTypeObject *)container, &PyDict_Type)) {
        PyErr_SetString(PyExc_TypeError, "ContainerDecoder(unpack, container, names, fallback): "
                                         "unpack and fallback callables, container a dict type");
        return -1;
    }
    Py_XSETREF(self->unpack, Py_NewRef(unpack));
    Py_XSETREF(self->container, Py_NewRef(container));
    Py_XSETREF(self->names, Py_NewRef(fields));
    Py_XSETREF(self->fallback, Py_NewRef(fallback));
    self->size = -1;
    if (format != NULL)
        cdec_read_format(self, format, PyTuple_GET_SIZE(fields));
    return 0;
}

static int
cdec_traverse(ContainerDecoder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->unpack);
    Py_VISIT(self->container);
    Py_VISIT(self->names);
    Py_VISIT(self->fallback);
    return 0;
}

static int
cdec_clear(ContainerDecoder *self)
{
    Py_CLEAR(self->unpack);
    Py_CLEAR(self->container);
    Py_CLEAR(self->names);
    Py_CLEAR(self->fallback);
    return 0;
}

static void
cdec_dealloc(ContainerDecoder *self)
{
    PyObject_GC_UnTrack(self);
    cdec_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* One field of p, as struct.unpack gives it. */
static PyObject *
cdec_field(const CdecField *field, const unsigned char *p)
{
    p += field->offset;
    switch (field->code) {
    case 's':
        return PyBytes_FromStringAndSize((const char *)p, field->size);
    case 'e': case 'f': case 'd': {
        double value = field->code == 'e'   ? PyFloat_Unpack2((const char *)p, field->little)
                       : field->code == 'f' ? PyFloat_Unpack4((const char *)p, field->little)
                                            : PyFloat_Unpack8((const char *)p, field->little);
        if (value == -1.0 && PyErr_Occurred())
            return NULL;
        return PyFloat_FromDouble(value);
    }
    }
    unsigned long long bits = 0;
    Py_ssize_t size = field->size;
    for (Py_ssize_t i = 0; i < size; i++)
        bits = (bits << 8) | p[field->little ? size - 1 - i : i];
    switch (field->code) {
    case 'b': case 'h': case 'l': case 'i': case 'q': {
        long long value;
        if (size == 8) {
            value = (long long)bits; /* two's complement, as gcc and clang define it */
        } else {
            unsigned long long sign = 1ULL << (8 * size - 1);
            value = (long long)(bits ^ sign) - (long long)sign;
        }
        return PyLong_FromLongLong(value);
    }
    default:
        return PyLong_FromUnsignedLongLong(bits);
    }
}

/* The fields of data as a tuple: read here, or by unpack; NULL with an
   error set on failure. */
static PyObject *
cdec_unpack(ContainerDecoder *self, PyObject *data)
{
    if (self->size < 0 || !PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) != self->size)
        return PyObject_CallOneArg(self->unpack, data);
    Py_ssize_t count = PyTuple_GET_SIZE(self->names);
    PyObject *fields = PyTuple_New(count);
    if (fields == NULL)
        return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = cdec_field(&self->fields[i], p);
        if (value == NULL) {
            Py_DECREF(fields);
            return NULL;
        }
        PyTuple_SET_ITEM(fields, i, value);
    }
    return fields;
}

static PyObject *
cdec_decode(ContainerDecoder *self, PyObject *data)
{
    if (self->unpack == NULL) {
        PyErr_SetString(PyExc_ValueError, "ContainerDecoder is not initialised");
        return NULL;
    }
    PyObject *fields = cdec_unpack(self, data);
    Py_ssize_t count = PyTuple_GET_SIZE(self->names);
    if (fields == NULL || !PyTuple_CheckExact(fields) || PyTuple_GET_SIZE(fields) != count) {
        if (fields == NULL && !PyErr_ExceptionMatches(PyExc_Exception))
            return NULL; /* KeyboardInterrupt and the like go through */
        PyErr_Clear();
        Py_XDECREF(fields);
        return PyObject_CallOneArg(self->fallback, data);
    }
    /* The container's __init__ is dict's (codecs.py checks), a no-op without
       arguments: its __new__ alone makes the same empty container. */
    PyTypeObject *container = (PyTypeObject *)self->container;
    PyObject *no_arguments = PyTuple_New(0); /* the shared empty tuple */
    PyObject *result =
        no_arguments == NULL ? NULL : container->tp_new(container, no_arguments, NULL);
    Py_XDECREF(no_arguments);
    if (result != NULL && !PyDict_Check(result)) {
        PyErr_SetString(PyExc_TypeError, "ContainerDecoder: the container is not a dict");
        Py_CLEAR(result);
    }
    int atomic = 1; /* every field an int, a float, a bool or bytes: nothing to track */
    for (Py_ssize_t i = 0; result != NULL && i < count; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        atomic = atomic && (PyLong_CheckExact(field) || PyBytes_CheckExact(field) ||
                            PyFloat_CheckExact(field) || PyBool_Check(field));
        if (PyDict_SetItem(result, PyTuple_GET_ITEM(self->names, i), field) < 0)
            Py_CLEAR(result);
    }
    Py_DECREF(fields);
    /* As the interpreter does for a plain dict of atomic values: the GC does
       not track it, and tracks it again as soon as an item that it tracks
       is set (dict item assignment does, whatever the dict's type). The
       Container's one slot, __recursion_lock__, is construct's own flag. */
    if (result != NULL && atomic && PyObject_GC_IsTracked(result))
        PyObject_GC_UnTrack(result);
    return result;
}

static PyMethodDef cdec_methods[] = {
    {"decode", (PyCFunction)cdec_decode, METH_O,
     "decode(data) -> Container: the fields of data, by name."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ContainerDecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.ContainerDecoder",
    .tp_basicsize = sizeof(ContainerDecoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "ContainerDecoder(unpack, container, names, fallback): a Struct codec's decode.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)cdec_init,
    .tp_traverse = (traverseproc)cdec_traverse,
    .tp_clear = (inquiry)cdec_clear,
    .tp_dealloc = (destructor)cdec_dealloc,
    .tp_methods = cdec_methods,
};

/* mappable(fd) -> bool: whether the file system of ``fd`` is one where a
   log may be written through a shared mapping: one that allocates the
   blocks posix_fallocate asks for (so a store into the mapping never meets
   a full disk, which would kill the process with SIGBUS) and writes them in
   place (no copy on write). ext2/3/4, XFS and tmpfs; anything else writes. */
static PyObject *
accel_mappable(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0)
        return NULL;
#ifdef __linux__
    struct statfs info;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = fstatfs(fd, &info);
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_SetFromErrno(PyExc_OSError);
    switch ((unsigned long)info.f_type) {
    case 0xEF53UL:     /* ext2, ext3, ext4 */
    case 0x58465342UL: /* XFS */
    case 0x01021994UL: /* tmpfs */
        Py_RETURN_TRUE;
    default:
        Py_RETURN_FALSE;
    }
#else
    Py_RETURN_FALSE;
#endif
}

/* reserve(fd, offset, length) -> bool | None: allocate the file's blocks
   of [offset, offset + length) without changing its size (Linux's
   FALLOC_FL_KEEP_SIZE), so appends there need no block allocation. True
   when done; False when it failed this time (no room, interrupted: part of
   the range may be allocated); None when the platform or the file system
   cannot. Appends need none of it: they allocate what is missing, and
   report a full disk themselves. */
static PyObject *
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

static PyMethodDef accel_functions[] = {
    {"crc32", (PyCFunction)accel_crc32, METH_O, "crc32(data) -> int, as zlib.crc32."},
    {"reserve", (PyCFunction)accel_reserve, METH_VARARGS,
     "reserve(fd, offset, length) -> bool | None: allocate those blocks, keeping the file's "
     "size; None where that cannot be done."},
    {"mappable", (PyCFunction)accel_mappable, METH_O,
     "mappable(fd) -> bool: whether a log on this file system may be written through a map."},
    {"clmul", (PyCFunction)accel_clmul, METH_NOARGS,
     "clmul() -> bool: whether long runs are checksummed by carry-less multiplication."},
    {"framed", (PyCFunction)(void (*)(void))accel_framed, METH_FASTCALL,
     "framed(*parts) -> bytes: the parts, then the CRC-32 of them all (little-endian)."},
    {"value_of_record", (PyCFunction)(void (*)(void))accel_value_of_record, METH_FASTCALL,
     "value_of_record(buffer, offset, length, key) -> bytes | None: a checked value."},
    {"replay_log", (PyCFunction)(void (*)(void))accel_replay_log, METH_FASTCALL,
     "replay_log(buffer, key_size, value_size, bindings) -> int: where replay stopped."},
    {"write_framed", (PyCFunction)(void (*)(void))accel_write_framed, METH_FASTCALL,
     "write_framed(fd, offset, *parts) -> int: framed(*parts) written at offset, in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "l2_stores.engine._accel",
    .m_doc = "Optional C accelerator of the data file's lookups.",
    .m_size = -1,
    .m_methods = accel_functions,
};

PyMODINIT_FUNC
PyInit__accel(void)
{
    crc32_init();
    if (PyType_Ready(&LogTailType) < 0 ||
        PyType_Ready(&ValuesTailType) < 0 || PyType_Ready(&IndexedAppendType) < 0 ||
        PyType_Ready(&WriterType) < 0 || PyType_Ready(&LruCacheType) < 0 ||
        PyType_Ready(&ContainerDecoderType) < 0)
        return NULL;
    str_target = PyUnicode_InternFromString("target");
    str_append_entry = PyUnicode_InternFromString("append_entry");
    str_put = PyUnicode_InternFromString("put");
    if (str_target == NULL || str_append_entry == NULL || str_put == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&accel_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObject(module, "LOG_FORMAT",
                           Py_BuildValue("(iiiii)", LOG_OP_SET, LOG_OP_REMOVE, LOG_OP_MARK,
                                         LOG_OP_SEAL, LOG_SYNCED)) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&LogTailType);
    if (PyModule_AddObject(module, "LogTail", (PyObject *)&LogTailType) < 0) {
        Py_DECREF(&LogTailType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&IndexedAppendType);
    if (PyModule_AddObject(module, "IndexedAppend", (PyObject *)&IndexedAppendType) < 0) {
        Py_DECREF(&IndexedAppendType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&ValuesTailType);
    if (PyModule_AddObject(module, "ValuesTail", (PyObject *)&ValuesTailType) < 0) {
        Py_DECREF(&ValuesTailType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&WriterType);
    if (PyModule_AddObject(module, "Writer", (PyObject *)&WriterType) < 0) {
        Py_DECREF(&WriterType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&LruCacheType);
    if (PyModule_AddObject(module, "LruCache", (PyObject *)&LruCacheType) < 0) {
        Py_DECREF(&LruCacheType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&ContainerDecoderType);
    if (PyModule_AddObject(module, "ContainerDecoder", (PyObject *)&ContainerDecoderType) < 0) {
        Py_DECREF(&ContainerDecoderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
