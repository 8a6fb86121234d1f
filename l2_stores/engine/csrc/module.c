/* The module l2_stores.engine._runs: its init only (see run_lookup.c for
   the reader, run_writer.c for the builder and the merge, run_cursor.c for
   ordered reads, filter.c for the filter, format.h for the constants). It is
   optional: without it, run.py reads runs in Python (see accel.py). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "crc32.h"
#include "format.h"
#include "layers.h"
#include "run_cursor.h"
#include "run_lookup.h"
#include "run_writer.h"

static PyMethodDef runs_functions[] = {
    {"find_first", (PyCFunction)(void (*)(void))runs_find_first, METH_FASTCALL,
     runs_find_first_doc},
    {"count_changes", (PyCFunction)(void (*)(void))runs_count_changes, METH_FASTCALL,
     runs_count_changes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef runs_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "l2_stores.engine._runs",
    .m_doc = "Optional C reader and writer of runs: find, seek, the filter, checked rows; the\n"
              "byte work of writing a run, and the merge of runs.",
    .m_size = -1,
    .m_methods = runs_functions,
};

/* _runs.FORMAT: format.h's constants by name, for run.py and filter.py to
   compare with theirs. */
static PyObject *
format_constants(void)
{
    PyObject *format = PyDict_New();
    if (format == NULL)
        return NULL;
#define ADD_CONSTANT(name, value)                                                  \
    do {                                                                           \
        PyObject *number = PyLong_FromUnsignedLongLong((unsigned long long)(value)); \
        if (number == NULL || PyDict_SetItemString(format, name, number) < 0) {    \
            Py_XDECREF(number);                                                    \
            Py_DECREF(format);                                                     \
            return NULL;                                                           \
        }                                                                          \
        Py_DECREF(number);                                                         \
    } while (0);
    RUN_FORMAT_CONSTANTS(ADD_CONSTANT)
#undef ADD_CONSTANT
    return format;
}

PyMODINIT_FUNC
PyInit__runs(void)
{
    crc32_init();
    if (PyType_Ready(&RunReaderType) < 0 || PyType_Ready(&RunBuilderType) < 0 ||
        PyType_Ready(&LayersType) < 0 || PyType_Ready(&MergeCursorType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&runs_module);
    if (module == NULL)
        return NULL;
    PyObject *format = NULL;
    if (RunCorrupt == NULL) {
        RunCorrupt = PyErr_NewExceptionWithDoc(
            "l2_stores.engine._runs.RunCorrupt",
            "RunCorrupt(what, offset): a checksum or an index section of a run failed at\n"
            "that file offset (run.py raises CannotReadFromStore in its place).",
            NULL, NULL);
        if (RunCorrupt == NULL)
            goto error;
    }
    format = format_constants();
    if (format == NULL || PyModule_AddObject(module, "FORMAT", format) < 0) {
        Py_XDECREF(format);
        goto error;
    }
    if (PyModule_AddObjectRef(module, "RunCorrupt", RunCorrupt) < 0 ||
        PyModule_AddObjectRef(module, "RunReader", (PyObject *)&RunReaderType) < 0 ||
        PyModule_AddObjectRef(module, "RunBuilder", (PyObject *)&RunBuilderType) < 0 ||
        PyModule_AddObjectRef(module, "Layers", (PyObject *)&LayersType) < 0 ||
        PyModule_AddObjectRef(module, "MergeCursor", (PyObject *)&MergeCursorType) < 0)
        goto error;
    return module;
error:
    Py_DECREF(module);
    return NULL;
}
