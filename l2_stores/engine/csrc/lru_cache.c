/* LruCache: the indexed files' cache of (value, header) pairs. */

#define PY_SSIZE_T_CLEAN
#ifdef __linux__
#define _GNU_SOURCE /* sync_file_range, fallocate */
#endif
#include <Python.h>
#include <structmember.h>
#include <string.h>

#include "accel.h"

/* ---------------------------------------------------------------- LruCache */

/* The indexed files' cache of recently read or appended (value, header)
   pairs: a dict from key to slot number, and per slot the key, the entry,
   its weight and its neighbours in a list from the newest to the oldest.
   It keeps at most `capacity` entries weighing at most `max_bytes` in all;
   an entry's weight is the length of the bytes in it (an entry is a tuple
   of bytes), and an entry heavier than max_bytes is not kept at all. The
   list and the dict change together inside one call, which holds the GIL
   and runs no Python code (keys are exact bytes), so readers need no lock.
   A reference dropped by a call is released only once the cache is
   consistent again. */

typedef struct {
    PyObject_HEAD
    PyObject *slots;   /* dict: key -> slot number (int) */
    PyObject **keys;   /* per slot */
    PyObject **entries;
    Py_ssize_t *weights;
    Py_ssize_t *newer; /* per slot: the next newer slot, or -1 */
    Py_ssize_t *older; /* per slot: the next older slot, or -1; free slots: the next free */
    Py_ssize_t newest, oldest, free, used, filled, allocated, capacity;
    Py_ssize_t max_bytes;
    /* At most max_bytes, plus one entry's weight (at most max_bytes) for
       the length of a put: unsigned, it cannot overflow. */
    unsigned long long bytes;
    unsigned long long hits, misses; /* of get */
} LruCache;

/* The arrays grow with use (doubling, up to the capacity), so a large
   capacity costs nothing until it is filled. Slots below `filled` are in
   the list or in the free chain. */
#define LRU_FIRST_ALLOCATION 64

static void
lru_unlink(LruCache *self, Py_ssize_t slot)
{
    Py_ssize_t newer = self->newer[slot], older = self->older[slot];
    if (newer >= 0)
        self->older[newer] = older;
    else
        self->newest = older;
    if (older >= 0)
        self->newer[older] = newer;
    else
        self->oldest = newer;
}

static void
lru_push_newest(LruCache *self, Py_ssize_t slot)
{
    self->newer[slot] = -1;
    self->older[slot] = self->newest;
    if (self->newest >= 0)
        self->newer[self->newest] = slot;
    else
        self->oldest = slot;
    self->newest = slot;
}

static void
lru_touch(LruCache *self, Py_ssize_t slot)
{
    if (self->newest != slot) {
        lru_unlink(self, slot);
        lru_push_newest(self, slot);
    }
}

/* Room for one more slot; -1 with MemoryError (nothing changed) if none. */
static int
lru_grow(LruCache *self)
{
    if (self->free >= 0 || self->filled < self->allocated)
        return 0;
    Py_ssize_t size = self->allocated ? 2 * self->allocated : LRU_FIRST_ALLOCATION;
    if (size > self->capacity || size < 0)
        size = self->capacity;
    /* Each array is replaced only once its copy exists: a failure leaves
       the cache as it was (arrays longer than needed are harmless). */
    PyObject **keys = PyMem_Realloc(self->keys, (size_t)size * sizeof(PyObject *));
    if (keys == NULL)
        goto no_memory;
    self->keys = keys;
    PyObject **entries = PyMem_Realloc(self->entries, (size_t)size * sizeof(PyObject *));
    if (entries == NULL)
        goto no_memory;
    self->entries = entries;
    Py_ssize_t *weights = PyMem_Realloc(self->weights, (size_t)size * sizeof(Py_ssize_t));
    if (weights == NULL)
        goto no_memory;
    self->weights = weights;
    Py_ssize_t *newer = PyMem_Realloc(self->newer, (size_t)size * sizeof(Py_ssize_t));
    if (newer == NULL)
        goto no_memory;
    self->newer = newer;
    Py_ssize_t *older = PyMem_Realloc(self->older, (size_t)size * sizeof(Py_ssize_t));
    if (older == NULL)
        goto no_memory;
    self->older = older;
    self->allocated = size;
    return 0;
no_memory:
    PyErr_NoMemory();
    return -1;
}

/* A free slot, after lru_grow made room. */
static Py_ssize_t
lru_take_slot(LruCache *self)
{
    Py_ssize_t slot = self->free;
    if (slot >= 0) {
        self->free = self->older[slot];
        return slot;
    }
    return self->filled++;
}

static void
lru_release_slot(LruCache *self, Py_ssize_t slot)
{
    self->older[slot] = self->free;
    self->free = slot;
}

/* Take slot out of the list, the dict and the weight; its key and entry
   are left to the caller to release. The dict deletion cannot fail: the
   key is there and is exact bytes (its hash and comparison cannot fail). */
static int
lru_detach(LruCache *self, Py_ssize_t slot)
{
    if (PyDict_DelItem(self->slots, self->keys[slot]) < 0)
        return -1;
    lru_unlink(self, slot);
    self->bytes -= (unsigned long long)self->weights[slot];
    self->used--;
    lru_release_slot(self, slot);
    return 0;
}

/* Take slot out and release its key and entry, the cache consistent (so what
   their release runs may use it); -1 on error. */
static int
lru_drop(LruCache *self, Py_ssize_t slot)
{
    PyObject *old_key = self->keys[slot], *old_entry = self->entries[slot];
    if (lru_detach(self, slot) < 0)
        return -1;
    Py_DECREF(old_key);
    Py_DECREF(old_entry);
    return 0;
}

/* Drop the oldest entries until the weight fits; -1 on error. */
static int
lru_fit(LruCache *self)
{
    while (self->bytes > (unsigned long long)self->max_bytes && self->oldest >= 0) {
        if (lru_drop(self, self->oldest) < 0)
            return -1;
    }
    return 0;
}

/* The weight of an entry: the length of the bytes in it (at most
   PY_SSIZE_T_MAX, where the same bytes are in it many times). */
static Py_ssize_t
lru_weight(PyObject *entry)
{
    if (PyBytes_Check(entry))
        return PyBytes_GET_SIZE(entry);
    if (!PyTuple_Check(entry))
        return 0;
    Py_ssize_t weight = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(entry); i++) {
        PyObject *item = PyTuple_GET_ITEM(entry, i);
        if (PyBytes_Check(item))
            weight = PyBytes_GET_SIZE(item) > PY_SSIZE_T_MAX - weight
                         ? PY_SSIZE_T_MAX
                         : weight + PyBytes_GET_SIZE(item);
    }
    return weight;
}

static int
lru_init(LruCache *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"capacity", "max_bytes", NULL};
    Py_ssize_t capacity, max_bytes = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|n:LruCache", names, &capacity, &max_bytes))
        return -1;
    if (capacity < 0) {
        PyErr_Format(PyExc_ValueError, "cache capacity must be at least 0, got %zd", capacity);
        return -1;
    }
    if (max_bytes < 0) {
        PyErr_Format(PyExc_ValueError, "cache max_bytes must be at least 0, got %zd", max_bytes);
        return -1;
    }
    if (self->slots != NULL) {
        PyErr_SetString(PyExc_TypeError, "LruCache is initialised once");
        return -1;
    }
    self->slots = PyDict_New();
    if (self->slots == NULL)
        return -1;
    self->newest = self->oldest = self->free = -1;
    self->capacity = capacity;
    self->max_bytes = max_bytes;
    return 0;
}

static int
lru_traverse(LruCache *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slots);
    /* Counted, not only linked: a cache whose __init__ failed has no list. */
    Py_ssize_t slot = self->newest;
    for (Py_ssize_t left = self->used; left > 0; left--, slot = self->older[slot])
        Py_VISIT(self->entries[slot]);
    return 0;
}

/* Empty the cache; cannot fail. The arrays are detached first and their
   references dropped last, so code run by a deallocation sees an empty,
   consistent cache. */
static void
lru_empty(LruCache *self)
{
    PyObject **keys = self->keys, **entries = self->entries;
    Py_ssize_t *older = self->older, slot = self->newest, left = self->used;
    PyMem_Free(self->newer);
    PyMem_Free(self->weights);
    self->keys = self->entries = NULL;
    self->newer = self->older = self->weights = NULL;
    self->used = self->filled = self->allocated = 0;
    self->bytes = 0;
    self->newest = self->oldest = self->free = -1;
    if (self->slots != NULL)
        PyDict_Clear(self->slots);
    for (; left > 0; left--, slot = older[slot]) {
        Py_DECREF(keys[slot]);
        Py_DECREF(entries[slot]);
    }
    PyMem_Free(older);
    PyMem_Free(keys);
    PyMem_Free(entries);
}

static int
lru_clear_references(LruCache *self)
{
    lru_empty(self);
    Py_CLEAR(self->slots);
    return 0;
}

static void
lru_dealloc(LruCache *self)
{
    PyObject_GC_UnTrack(self);
    lru_clear_references(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
lru_ready(LruCache *self)
{
    if (self->slots == NULL) {
        PyErr_SetString(PyExc_ValueError, "LruCache is not initialised");
        return 0;
    }
    return 1;
}

/* The slot of key, -1 if absent, -2 on error. */
static Py_ssize_t
lru_slot_of(LruCache *self, PyObject *key)
{
    if (!PyBytes_CheckExact(key)) {
        PyErr_Format(PyExc_TypeError, "LruCache keys are bytes, got %.100s",
                     Py_TYPE(key)->tp_name);
        return -2;
    }
    PyObject *slot = PyDict_GetItemWithError(self->slots, key);
    if (slot == NULL)
        return PyErr_Occurred() ? -2 : -1;
    return PyLong_AsSsize_t(slot);
}

static PyObject *
lru_get(LruCache *self, PyObject *key)
{
    if (!lru_ready(self))
        return NULL;
    Py_ssize_t slot = lru_slot_of(self, key);
    if (slot == -2)
        return NULL;
    if (slot < 0) {
        self->misses++;
        Py_RETURN_NONE;
    }
    self->hits++;
    lru_touch(self, slot);
    return Py_NewRef(self->entries[slot]);
}

static PyObject *
lru_put(LruCache *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "LruCache.put(key, entry) takes 2 arguments");
        return NULL;
    }
    if (!lru_ready(self))
        return NULL;
    PyObject *key = args[0], *entry = args[1];
    Py_ssize_t slot = lru_slot_of(self, key);
    if (slot == -2)
        return NULL;
    Py_ssize_t weight = lru_weight(entry);
    int kept = self->capacity > 0 && weight <= self->max_bytes;
    if (slot >= 0 && !kept) { /* the cached entry is stale, and its successor is not kept */
        if (lru_drop(self, slot) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    if (slot >= 0) { /* a newer entry for a cached key */
        PyObject *old_entry = self->entries[slot];
        self->entries[slot] = Py_NewRef(entry);
        self->bytes += (unsigned long long)weight;
        self->bytes -= (unsigned long long)self->weights[slot];
        self->weights[slot] = weight;
        lru_touch(self, slot);
        Py_DECREF(old_entry);
        if (lru_fit(self) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    if (!kept)
        Py_RETURN_NONE;
    PyObject *old_key = NULL, *old_entry = NULL;
    if (self->used == self->capacity) { /* evict the oldest; released at the end */
        old_key = self->keys[self->oldest];
        old_entry = self->entries[self->oldest];
        if (lru_detach(self, self->oldest) < 0)
            return NULL;
    } else if (lru_grow(self) < 0) {
        return NULL;
    }
    slot = lru_take_slot(self);
    PyObject *number = PyLong_FromSsize_t(slot);
    int failed = number == NULL || PyDict_SetItem(self->slots, key, number) < 0;
    Py_XDECREF(number);
    if (failed) {
        lru_release_slot(self, slot);
    } else {
        self->keys[slot] = Py_NewRef(key);
        self->entries[slot] = Py_NewRef(entry);
        self->weights[slot] = weight;
        self->bytes += (unsigned long long)weight;
        self->used++;
        lru_push_newest(self, slot);
    }
    Py_XDECREF(old_key);
    Py_XDECREF(old_entry);
    if (failed || lru_fit(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
lru_discard(LruCache *self, PyObject *key)
{
    if (!lru_ready(self))
        return NULL;
    Py_ssize_t slot = lru_slot_of(self, key);
    if (slot == -2 || (slot >= 0 && lru_drop(self, slot) < 0))
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
lru_clear_method(LruCache *self, PyObject *Py_UNUSED(ignored))
{
    if (!lru_ready(self))
        return NULL;
    lru_empty(self);
    Py_RETURN_NONE;
}

static PyObject *
lru_keys(LruCache *self, PyObject *Py_UNUSED(ignored))
{
    if (!lru_ready(self))
        return NULL;
    PyObject *keys = PyList_New(0);
    if (keys == NULL)
        return NULL;
    for (Py_ssize_t slot = self->oldest; slot >= 0; slot = self->newer[slot]) {
        if (PyList_Append(keys, self->keys[slot]) < 0) {
            Py_DECREF(keys);
            return NULL;
        }
    }
    return keys;
}

static Py_ssize_t
lru_length(LruCache *self)
{
    return self->used;
}

PyObject *
lru_cache_put(PyObject *cache, PyObject *const *args, Py_ssize_t nargs)
{
    return lru_put((LruCache *)cache, args, nargs);
}

static PyMethodDef lru_methods[] = {
    {"get", (PyCFunction)lru_get, METH_O,
     "get(key) -> entry | None: the cached entry of key, now the newest."},
    {"put", (PyCFunction)(void (*)(void))lru_put, METH_FASTCALL,
     "put(key, entry): cache entry as the newest; the oldest go past the limits."},
    {"discard", (PyCFunction)lru_discard, METH_O, "discard(key): drop key's entry, if cached."},
    {"clear", (PyCFunction)lru_clear_method, METH_NOARGS, "clear(): drop every entry."},
    {"keys", (PyCFunction)lru_keys, METH_NOARGS, "keys() -> list: the cached keys, oldest first."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef lru_members[] = {
    {"capacity", T_PYSSIZET, offsetof(LruCache, capacity), READONLY,
     "The most entries kept."},
    {"max_bytes", T_PYSSIZET, offsetof(LruCache, max_bytes), READONLY,
     "The most bytes kept, all entries together."},
    {"used_bytes", T_ULONGLONG, offsetof(LruCache, bytes), READONLY,
     "The bytes kept now."},
    {"hits", T_ULONGLONG, offsetof(LruCache, hits), READONLY, "The gets that found their key."},
    {"misses", T_ULONGLONG, offsetof(LruCache, misses), READONLY,
     "The gets that did not find their key."},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods lru_as_sequence = {
    .sq_length = (lenfunc)lru_length,
};

PyTypeObject LruCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._accel.LruCache",
    .tp_basicsize = sizeof(LruCache),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "LruCache(capacity, max_bytes=sys.maxsize): the newest entries put or got, by "
              "bytes key, at most capacity of them and max_bytes of bytes in all.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lru_init,
    .tp_traverse = (traverseproc)lru_traverse,
    .tp_clear = (inquiry)lru_clear_references,
    .tp_dealloc = (destructor)lru_dealloc,
    .tp_methods = lru_methods,
    .tp_members = lru_members,
    .tp_as_sequence = &lru_as_sequence,
};
