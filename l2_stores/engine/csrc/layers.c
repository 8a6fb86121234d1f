/* Layers: an index's read path in one call. The active log's dict, then
   the frozen log's dict (while a flush runs), then the runs, newest first,
   through the C run readers (first_answer in run_lookup.c) when the index
   has them all, else through the index's Python lookup of its runs. The
   index hands it all four with set() in its exclusive section whenever one
   changes (index.py's _hand_over); it reads no attribute of the index. A
   key bound to None in a dict (a removal) answers None without looking
   further, and so does a run's removal row. When a run reader finds damage
   (RunCorrupt), the Python lookup answers instead: it searches around a
   damaged row, or raises the store's error. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "layers.h"
#include "run_lookup.h"

typedef struct {
    PyObject_HEAD
    PyObject *active;  /* dict */
    PyObject *frozen;  /* dict or None */
    PyObject *readers; /* tuple of RunReader, newest first, or None */
    PyObject *removed; /* what the readers answer for a removal (None without readers) */
    PyObject *find;    /* callable or None: the runs' lookup in Python */
} Layers;

static int
layers_traverse(Layers *self, visitproc visit, void *arg)
{
    Py_VISIT(self->active);
    Py_VISIT(self->frozen);
    Py_VISIT(self->readers);
    Py_VISIT(self->removed);
    Py_VISIT(self->find);
    return 0;
}

static int
layers_clear(Layers *self)
{
    Py_CLEAR(self->active);
    Py_CLEAR(self->frozen);
    Py_CLEAR(self->readers);
    Py_CLEAR(self->removed);
    Py_CLEAR(self->find);
    return 0;
}

static void
layers_dealloc(Layers *self)
{
    PyObject_GC_UnTrack(self);
    layers_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
layers_set(Layers *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "Layers.set(active, frozen, readers, find, /)");
        return NULL;
    }
    PyObject *active = args[0], *frozen = args[1], *readers = args[2], *find = args[3];
    if (!PyDict_CheckExact(active) || (frozen != Py_None && !PyDict_CheckExact(frozen)) ||
        (find != Py_None && !PyCallable_Check(find))) {
        PyErr_SetString(PyExc_TypeError,
                        "Layers.set: active must be a dict, frozen a dict or None, "
                        "find a callable or None");
        return NULL;
    }
    if (readers != Py_None && readers_check(readers, "Layers.set") < 0)
        return NULL;
    PyObject *removed = Py_None;
    if (readers != Py_None && PyTuple_GET_SIZE(readers) > 0)
        removed = ((RunReader *)PyTuple_GET_ITEM(readers, 0))->removed;
    if (removed == NULL) {
        PyErr_SetString(PyExc_ValueError, "Layers.set: a reader is not initialized");
        return NULL;
    }
    Py_XSETREF(self->active, Py_NewRef(active));
    Py_XSETREF(self->frozen, Py_NewRef(frozen));
    Py_XSETREF(self->readers, Py_NewRef(readers));
    Py_XSETREF(self->removed, Py_NewRef(removed));
    Py_XSETREF(self->find, Py_NewRef(find));
    Py_RETURN_NONE;
}

static PyObject *
layers_get(Layers *self, PyObject *key)
{
    if (self->active == NULL)
        Py_RETURN_NONE;
    PyObject *value = PyDict_GetItemWithError(self->active, key);
    if (value == NULL && !PyErr_Occurred() && self->frozen != Py_None)
        value = PyDict_GetItemWithError(self->frozen, key);
    if (value != NULL)
        return Py_NewRef(value);
    if (PyErr_Occurred())
        return NULL;
    if (self->readers != Py_None && PyBytes_CheckExact(key)) {
        /* (a switch may replace the readers while they are read: hold them) */
        PyObject *readers = Py_NewRef(self->readers);
        PyObject *found = first_answer(readers, (const unsigned char *)PyBytes_AS_STRING(key),
                                       PyBytes_GET_SIZE(key));
        int removal = found != NULL && found == self->removed;
        Py_DECREF(readers);
        if (removal) {
            Py_DECREF(found);
            Py_RETURN_NONE;
        }
        if (found != NULL || !PyErr_ExceptionMatches(RunCorrupt))
            return found;
        PyErr_Clear(); /* damage: the Python lookup searches around it, or raises */
    }
    if (self->find == Py_None)
        Py_RETURN_NONE;
    PyObject *find = Py_NewRef(self->find);
    PyObject *found = PyObject_CallOneArg(find, key);
    Py_DECREF(find);
    return found;
}

static PyMethodDef layers_methods[] = {
    {"get", (PyCFunction)layers_get, METH_O,
     "get(key) -> value | None: the active dict, the frozen dict, then the runs."},
    {"set", (PyCFunction)(void (*)(void))layers_set, METH_FASTCALL,
     "set(active, frozen, readers, find, /): the layers from now on (readers: the runs'\n"
     "C readers, newest first, or None; find: the runs' Python lookup, or None)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject LayersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._runs.Layers",
    .tp_basicsize = sizeof(Layers),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An index's read path: the active log, the frozen log, the runs.",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)layers_traverse,
    .tp_clear = (inquiry)layers_clear,
    .tp_dealloc = (destructor)layers_dealloc,
    .tp_methods = layers_methods,
};
