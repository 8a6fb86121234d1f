/* ContainerDecoder: the decode of a construct Struct of fixed-size fields in one call. */

#define PY_SSIZE_T_CLEAN
#ifdef __linux__
#define _GNU_SOURCE /* sync_file_range, fallocate */
#endif
#include <Python.h>
#include <string.h>

#include "accel.h"

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

PyTypeObject ContainerDecoderType = {
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
