/* The C merge cursor (run_cursor.c), for the module's init (module.c). */

#ifndef L2_RUNS_RUN_CURSOR_H
#define L2_RUNS_RUN_CURSOR_H

#include <Python.h>

#include "format.h"

/* _runs.MergeCursor: the ordered merge of a store's logs and runs. */
RUNS_INTERNAL extern PyTypeObject MergeCursorType;

#endif
