/* A log's write path: LogTail, the tail state LogWriter (log.py) shares with
   the C put; Writer, the index's common put; and replay_log, the replay of
   a log's records at load. */

#define PY_SSIZE_T_CLEAN
#ifdef __linux__
#define _GNU_SOURCE /* sync_file_range, fallocate */
#endif
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "accel.h"

/* ---- the write path: a log's tail and the index's put ----

   LogTail holds what a log writer's appends change: log.py's LogWriter
   subclasses it, so that its Python paths and the C put below share one
   file descriptor, end offset, record count and pending buffer.

   Writer.put is Index.put for the common add: flushed, no fsync, nothing
   pending, no GC recording keys, bytes of the expected sizes, and room in
   the active log (one that does not fill the buffer; past it, while a
   merge runs, up to the pace threshold, from which the Python put paces
   writers). It works on the state the
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

PyTypeObject LogTailType = {
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
    Py_ssize_t pace_from;
    Py_ssize_t key_size;
    Py_ssize_t value_size;
} Writer;

static const unsigned char op_set = LOG_OP_SET;

static int
writer_init(Writer *self, PyObject *args, PyObject *kwargs)
{
    PyObject *put_in_python;
    Py_ssize_t buffer_size, pace_from, key_size, value_size;
    static char *names[] = {"put_in_python", "buffer_size", "pace_from", "key_size", "value_size",
                            NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Onnnn:Writer", names, &put_in_python,
                                     &buffer_size, &pace_from, &key_size, &value_size))
        return -1;
    if (buffer_size < 1 || pace_from < buffer_size || key_size < 0 || value_size < 0) {
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
    self->pace_from = pace_from;
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
   fails with an OSError: it writes again, and reports a failure as it
   does. An exception a signal handler raised during the write (Ctrl-C)
   goes on as the put's. */
static int
writer_put_fast(Writer *self, PyObject *key, PyObject *value)
{
    if (self->recording || self->log == Py_None || !PyBytes_CheckExact(key) ||
        !PyBytes_CheckExact(value) || PyBytes_GET_SIZE(key) != self->key_size ||
        PyBytes_GET_SIZE(value) != self->value_size)
        return 0;
    LogTail *tail = (LogTail *)self->log;
    /* below the buffer, not filling it; or while a merge runs, not reaching the
       pace threshold (from there the Python put paces writers) */
    int room = self->merging ? tail->records + 1 < self->pace_from
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
        /* the write releases the GIL: hold the log and the dict it is for, which
           a hand-over elsewhere could replace meanwhile */
        PyObject *log = Py_NewRef(self->log), *active = Py_NewRef(self->active);
        struct iovec iov[4];
        iov[0].iov_base = (void *)&op_set;
        iov[0].iov_len = 1;
        iov[1].iov_base = PyBytes_AS_STRING(key);
        iov[1].iov_len = (size_t)self->key_size;
        iov[2].iov_base = PyBytes_AS_STRING(value);
        iov[2].iov_len = (size_t)self->value_size;
        int failed_errno;
        Py_ssize_t written = write_frame(tail->fd, tail->end, iov, 3, &failed_errno);
        int bound = 0;
        if (written >= 0) {
            tail->end += written;
            tail->records += 1;
            bound = PyDict_SetItem(active, key, value) < 0 ? -1 : 1;
        }
        else if (failed_errno) /* (an OSError: the Python put writes again and reports) */
            PyErr_Clear();
        else /* another error: a signal handler's (Ctrl-C), which must not be lost */
            bound = -1;
        Py_DECREF(log);
        Py_DECREF(active);
        return bound;
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

PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Writer(put_in_python, buffer_size, pace_from, key_size, value_size): an index's put\n"
              "in C, on the state the index hands it with set().",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)writer_init,
    .tp_traverse = (traverseproc)writer_traverse,
    .tp_clear = (inquiry)writer_clear,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_methods = writer_methods,
};

/* replay_log(buffer, key_size, value_size, bindings) -> (position, synced_at,
   sealed, parts, valid_end): put the complete log records of buffer (op,
   key, value, CRC-32) into bindings, a set (op 1) as key -> value and a
   remove (op 2) as key -> None, in order; marks (op 3) and seals (op 4) bind
   nothing. A part (begin, op 5, to end, op 6) binds its records only at its
   end. Bit 7 of the op byte is the SYNCED flag. Stop at the first record
   whose checksum or op fails (an end outside a part, a mark, seal or begin
   inside one), or after a seal; return where it stopped (an open part's
   begin), the position of the last record with the SYNCED flag or a mark
   before it (-1: none), whether it stopped after a seal, the parts taken
   and the end of the last good record. (log.py's _replay_in_python is the
   same loop.) */

PyObject *
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
    Py_ssize_t complete = view.len - view.len % size, position = 0, synced_at = -1, parts = 0;
    Py_ssize_t part_start = -1, part_synced_at = -1;
    PyObject *part = NULL; /* an open part's bindings */
    int sealed = 0;
    while (position < complete) {
        const unsigned char *record = base + position;
        int op = record[0] & LOG_OP_MASK;
        if (op < LOG_OP_SET || op > LOG_OP_END ||
            crc32_of(record, size - 4) != read_u32(record + size - 4))
            break;
        if ((op == LOG_OP_END && part == NULL) ||
            (op >= LOG_OP_MARK && op != LOG_OP_END && part != NULL))
            break;
        if (op <= LOG_OP_REMOVE) {
            PyObject *key = PyBytes_FromStringAndSize((const char *)record + 1, key_size);
            PyObject *value = op == LOG_OP_SET ? PyBytes_FromStringAndSize(
                                                     (const char *)record + 1 + key_size, value_size)
                                               : Py_NewRef(Py_None);
            int failed = key == NULL || value == NULL ||
                         PyDict_SetItem(part != NULL ? part : bindings, key, value) < 0;
            Py_XDECREF(key);
            Py_XDECREF(value);
            if (failed)
                goto error;
        }
        if (op == LOG_OP_BEGIN) {
            part = PyDict_New();
            if (part == NULL)
                goto error;
            part_start = position;
            part_synced_at = synced_at;
        }
        if ((record[0] & LOG_SYNCED) || op == LOG_OP_MARK)
            synced_at = position;
        position += size;
        if (op == LOG_OP_END) {
            int failed = PyDict_Update(bindings, part) < 0;
            Py_CLEAR(part);
            if (failed)
                goto error;
            parts++;
        }
        if (op == LOG_OP_SEAL) {
            sealed = 1;
            break;
        }
    }
    PyBuffer_Release(&view);
    if (part != NULL) {
        Py_DECREF(part);
        return Py_BuildValue("(nnOnn)", part_start, part_synced_at, Py_False, parts, position);
    }
    return Py_BuildValue("(nnOnn)", position, synced_at, sealed ? Py_True : Py_False, parts,
                         position);

error:
    Py_XDECREF(part);
    PyBuffer_Release(&view);
    return NULL;
}
