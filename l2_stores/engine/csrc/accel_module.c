/* The module l2_stores.engine._accel: its functions and types, and its init.
   Optional: without it every path is Python (see accel.py). */

#define PY_SSIZE_T_CLEAN
#ifdef __linux__
#define _GNU_SOURCE /* sync_file_range, fallocate */
#endif
#include <Python.h>

#include "accel.h"

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
    .m_doc = "Optional C accelerator: checksums, framing, the log's and values files' tails,\n"
             "the index's put, the log's replay, the indexed files' cache and appends.",
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
    if (indexed_append_names() < 0)
        return NULL;
    PyObject *module = PyModule_Create(&accel_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObject(module, "LOG_FORMAT",
                           Py_BuildValue("(iiiiiii)", LOG_OP_SET, LOG_OP_REMOVE, LOG_OP_MARK,
                                         LOG_OP_SEAL, LOG_OP_BEGIN, LOG_OP_END, LOG_SYNCED)) < 0) {
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
