/* The C run reader (run_lookup.c), for the module's init (module.c). */

#ifndef L2_RUNS_RUN_LOOKUP_H
#define L2_RUNS_RUN_LOOKUP_H

#include <Python.h>

#include "format.h"

/* _runs.RunReader: lookups in one mapped run. */
RUNS_INTERNAL extern PyTypeObject RunReaderType;

/* _runs.RunCorrupt(what, offset), created by the module's init. */
RUNS_INTERNAL extern PyObject *RunCorrupt;

/* _runs.find_first(readers, key). */
RUNS_INTERNAL PyObject *runs_find_first(PyObject *module, PyObject *const *args,
                                        Py_ssize_t nargs);
RUNS_INTERNAL extern const char runs_find_first_doc[];

#endif
