/* The C run builder (run_writer.c), for the module's init (module.c). */

#ifndef L2_RUNS_RUN_WRITER_H
#define L2_RUNS_RUN_WRITER_H

#include <Python.h>

#include "format.h"

/* _runs.RunBuilder: the byte work of run.RunWriter (rows, filter, fences,
   radix, page checksums), and the k-way merge of runs' readers into it. */
RUNS_INTERNAL extern PyTypeObject RunBuilderType;

#endif
