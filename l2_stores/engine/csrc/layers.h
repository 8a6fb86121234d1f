/* An index's read path in one call (layers.c), for the module's init. */

#ifndef L2_RUNS_LAYERS_H
#define L2_RUNS_LAYERS_H

#include <Python.h>

#include "format.h"

/* _runs.Layers. */
RUNS_INTERNAL extern PyTypeObject LayersType;

#endif
