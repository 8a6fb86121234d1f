/* An indexed file's values files in C: ValuesTail, the tail state
   ValuesFile (values.py) shares with the C append; value_of_record, a
   checked read; IndexedAppend, an indexed file's append in one call. */

#define PY_SSIZE_T_CLEAN
#ifdef __linux__
#define _GNU_SOURCE /* sync_file_range, fallocate */
#endif
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "accel.h"

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

PyTypeObject ValuesTailType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.ValuesTail",
    .tp_basicsize = sizeof(ValuesTail),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A values file's tail: fd, end offset, reserved end; the common append in C.",
    .tp_new = valuestail_new,
    .tp_methods = valuestail_methods,
    .tp_members = valuestail_members,
};


/* value_of_record(buffer, offset, length, key) -> bytes | None: the value of
   the values-file record at ``offset`` (see values.py: n, key, value, n,
   crc), when the record lies inside the buffer, its length is ``length``,
   its key is ``key`` and its checksum holds; else None. */
PyObject *
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

/* ----------------------------------------------------------- IndexedAppend */

/* IndexedAppend(put, cache)(key, value, header): the body of an indexed
   file's append for encoded bytes, in one call: the record and its index
   entry from the target's append_entry, put(key, entry, True), and the pair
   cached. The values files hand it their target through retarget() each
   time it changes (ValueFiles.follow_target); it reads no attribute. It
   runs inside the writer's exclusive section (the caller's: see
   _idle_core's ExclusiveWrite). Errors propagate as the Python body lets
   them. */

typedef struct {
    PyObject_HEAD
    ValuesTail *target; /* the values file appends go to; NULL until retarget */
    PyObject *put;      /* the index's put */
    PyObject *cache;    /* the LRU cache */
    vectorcallfunc vectorcall;
} IndexedAppend;

static PyObject *str_put;

int
indexed_append_names(void)
{
    str_put = PyUnicode_InternFromString("put");
    return str_put != NULL ? 0 : -1;
}

static PyObject *
iappend_call(IndexedAppend *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (self->put == NULL || self->target == NULL) {
        PyErr_SetString(PyExc_TypeError, "IndexedAppend: no target to append to");
        return NULL;
    }
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "IndexedAppend(key, value, header)");
        return NULL;
    }
    /* the target is held across the append: a retarget meanwhile (a GC's
       begin, from a Python fallback) must not free it under the call */
    ValuesTail *target = (ValuesTail *)Py_NewRef(self->target);
    PyObject *entry = valuestail_append_entry(target, args, 3);
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
        done = lru_cache_put(self->cache, cache_args + 1, 2);
    else
        done = PyObject_VectorcallMethod(str_put, cache_args, 3, NULL);
    Py_DECREF(pair);
    if (done == NULL)
        return NULL;
    Py_DECREF(done);
    Py_RETURN_NONE;
}

static PyObject *
iappend_retarget(IndexedAppend *self, PyObject *target)
{
    if (!PyObject_TypeCheck(target, &ValuesTailType)) {
        PyErr_SetString(PyExc_TypeError, "IndexedAppend.retarget: the target must be a values file");
        return NULL;
    }
    Py_XSETREF(self->target, (ValuesTail *)Py_NewRef(target));
    Py_RETURN_NONE;
}

static PyMethodDef iappend_methods[] = {
    {"retarget", (PyCFunction)iappend_retarget, METH_O,
     "retarget(target): append to the values file `target` from now on."},
    {NULL, NULL, 0, NULL},
};

static int
iappend_init(IndexedAppend *self, PyObject *args, PyObject *kwargs)
{
    PyObject *put, *cache;
    if (kwargs != NULL || !PyArg_ParseTuple(args, "OO:IndexedAppend", &put, &cache))
        return -1;
    if (self->put != NULL) {
        PyErr_SetString(PyExc_TypeError, "IndexedAppend: already initialized");
        return -1;
    }
    if (!PyCallable_Check(put)) {
        PyErr_SetString(PyExc_TypeError, "IndexedAppend: put must be callable");
        return -1;
    }
    self->put = Py_NewRef(put);
    self->cache = Py_NewRef(cache);
    self->vectorcall = (vectorcallfunc)iappend_call;
    return 0;
}

static int
iappend_traverse(IndexedAppend *self, visitproc visit, void *arg)
{
    Py_VISIT(self->target);
    Py_VISIT(self->put);
    Py_VISIT(self->cache);
    return 0;
}

static int
iappend_clear(IndexedAppend *self)
{
    Py_CLEAR(self->target);
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

PyTypeObject IndexedAppendType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.IndexedAppend",
    .tp_doc = "IndexedAppend(put, cache)(key, value, header): an indexed file's append of\n"
              "encoded bytes: the target's append_entry, put(key, entry, True), cache.put.",
    .tp_methods = iappend_methods,
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
