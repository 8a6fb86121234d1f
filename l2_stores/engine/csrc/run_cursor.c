/* MergeCursor: a store's ordered merge of its logs and runs (Index.items), in C.

   runstack.merged_rows does the same in Python over the sources' own
   iterators; both give the same rows. The sources come newest first: the
   logs' dicts (key -> value, None for a removal) each with its keys in
   order, then the runs' readers. Each key comes once, from the newest
   source that holds it; removals are left out. Bounds and direction are
   fixed at creation: a log's by bisecting its keys, a run's by its seek.

   The cursor owns its state and reads no Python attribute. It holds its
   dicts, key lists and readers; the engine never changes a dict or a key
   list an iterator holds (it copies the active dict first), and a run's
   rows never change. Every run row is checked (its CRC) when it becomes a
   source's head, before its key is compared; a head taken from its run's
   header (below) is compared by the header's key until its row, checked,
   must show the same. Each step runs with the GIL held; a reader released
   meanwhile (the store closed) is seen at the next step, before its rows
   are read, and raises ValueError. A step reads the
   runs' rows before it allocates any object the garbage collector tracks
   (the result's tuple comes last), so no finalizer runs between. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "format.h"
#include "run_cursor.h"
#include "run_lookup.h"

typedef struct {
    RunReader *reader;    /* a run's, or NULL for a log */
    PyObject *bindings;   /* a log's dict */
    PyObject *keys;       /* a log's keys in order (a list) */
    PyObject *key_object; /* a log's head: its key, held (the list is not trusted) */
    Py_ssize_t position;  /* the head's index */
    Py_ssize_t limit;     /* the index past the last one to read (reverse: before) */
    const unsigned char *head; /* the head's key, NULL when done */
    int state;            /* a run head's: 1 a value, 2 a removal */
    int unread;           /* a run head at the run's first (reverse: last) row, its key
                             the header's bound: the row is read when it reaches the root */
} source;

/* The sources with a head are in a binary heap, the next key at its root
   (ties: the newest source first). A step takes the root's row and moves
   the root on; its next head is read, and sifted down, at the start of the
   next step (so that a failing row fails that step, and again any later
   one). A root whose key is the last key given is an older row of it: it
   is skipped the same way. Keys merged from disjoint runs (a counter) cost
   about three comparisons a step. A run whose range starts at or after the
   start (reverse: ends at or before it) enters the heap with its bound key
   from its header, and its row is read only if it reaches the root: a seek
   among disjoint runs reads the rows of one run, not of every run. */
typedef struct {
    PyObject_HEAD
    PyObject *readers; /* the tuple given, held */
    PyObject *logs;    /* the tuple given, held */
    PyObject *on_corrupt; /* a callable, or None */
    PyObject *closed;     /* a bytearray of one byte or more, or None */
    PyObject *on_closed;  /* a callable (when closed is not None) */
    source *sources;
    Py_ssize_t count;     /* sources */
    Py_ssize_t log_count; /* the first ones are logs, the rest runs */
    Py_ssize_t key_size;
    int step;             /* +1, or -1 in reverse */
    Py_ssize_t *heap;     /* indices of sources */
    Py_ssize_t heap_size;
    int started;          /* the heap is built */
    int root_moved;       /* the root's head is to be read at its new position */
    int given;            /* key holds the last key given (a removal's too) */
    int pinned;           /* the readers' cursors counts include this one */
    uint64_t released_seen; /* readers_released when every reader was last seen held */
    unsigned char *key;
} MergeCursor;

/* The first index of keys (a list of bytes) whose key is at least key, or -1
   with TypeError. */
static Py_ssize_t
bisect_list(PyObject *keys, const char *key, Py_ssize_t length)
{
    Py_ssize_t low = 0, high = PyList_GET_SIZE(keys);
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        PyObject *item = PyList_GET_ITEM(keys, middle);
        if (!PyBytes_CheckExact(item)) {
            PyErr_SetString(PyExc_TypeError, "MergeCursor: a log's keys are bytes");
            return -1;
        }
        if (compare((const unsigned char *)PyBytes_AS_STRING(item), PyBytes_GET_SIZE(item),
                    (const unsigned char *)key, length) < 0)
            low = middle + 1;
        else
            high = middle;
    }
    return low;
}

/* Read a run source's row at its position, its checksum checked, as its
   head: 0, or -1 with RunCorrupt set (naming the reader). */
static int
read_row(MergeCursor *self, Py_ssize_t at)
{
    source *s = &self->sources[at];
    s->state = row_state(s->reader, s->position);
    if (!s->state) {
        row_mismatch(s->reader, s->position);
        note_reader(at - self->log_count);
        return -1;
    }
    s->head = run_bytes(s->reader) + row_offset(s->reader, s->position);
    return 0;
}

/* Read the head at a source's position: 0, or -1 with an error set (a
   released reader, a row whose checksum fails, a log key of another size). */
static int
read_head(MergeCursor *self, Py_ssize_t at)
{
    source *s = &self->sources[at];
    if (s->position == s->limit) {
        s->head = NULL;
        Py_CLEAR(s->key_object);
        return 0;
    }
    if (s->reader == NULL) {
        if (s->position >= PyList_GET_SIZE(s->keys)) { /* (a list changed under it: never) */
            PyErr_SetString(PyExc_RuntimeError, "MergeCursor: a log's key list shrank");
            return -1;
        }
        PyObject *key = PyList_GET_ITEM(s->keys, s->position);
        if (!PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) != self->key_size) {
            PyErr_SetString(PyExc_ValueError, "MergeCursor: a log key of another size");
            return -1;
        }
        Py_XSETREF(s->key_object, Py_NewRef(key));
        s->head = (const unsigned char *)PyBytes_AS_STRING(key);
    } else if (read_row(self, at) < 0) {
        return -1;
    }
    return 0;
}

/* The value of a log's head: a borrowed reference, Py_None for a removal. */
static PyObject *
log_value(source *s)
{
    PyObject *value = PyDict_GetItemWithError(s->bindings, s->key_object);
    if (value == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_KeyError, "MergeCursor: a log key without its binding");
    return value;
}

/* Whether source a's head comes before source b's. */
static inline int
before(const MergeCursor *self, Py_ssize_t a, Py_ssize_t b)
{
    int order = key_order(self->sources[a].head, self->sources[b].head, self->key_size);
    return order * self->step < 0 || (order == 0 && a < b);
}

static void
sift_down(MergeCursor *self, Py_ssize_t at)
{
    Py_ssize_t *heap = self->heap, size = self->heap_size, moving = heap[at];
    for (;;) {
        Py_ssize_t child = 2 * at + 1;
        if (child >= size)
            break;
        if (child + 1 < size && before(self, heap[child + 1], heap[child]))
            child++;
        if (!before(self, heap[child], moving))
            break;
        heap[at] = heap[child];
        at = child;
    }
    heap[at] = moving;
}

/* Read the row of a head taken from its run's bound, checked against it: 0,
   or -1 with RunCorrupt set (naming the reader). */
static int
read_bound_row(MergeCursor *self, Py_ssize_t at)
{
    source *s = &self->sources[at];
    const unsigned char *bound = s->head;
    if (read_row(self, at) < 0)
        return -1;
    if (key_order(s->head, bound, self->key_size) != 0) {
        s->head = bound; /* still unread: the next step fails the same way */
        bound_mismatch(s->reader, s->position);
        note_reader(at - self->log_count);
        return -1;
    }
    s->unread = 0;
    return 0;
}

/* Take every head (a run's bound row by its header's key) and build the
   heap: 0, or -1 with an error set. */
static int
start(MergeCursor *self)
{
    for (Py_ssize_t i = 0; i < self->count; i++) {
        source *s = &self->sources[i];
        RunReader *reader = s->reader;
        if (reader != NULL && s->position != s->limit &&
            s->position == (self->step > 0 ? 0 : reader->count - 1)) {
            s->head = (const unsigned char *)PyBytes_AS_STRING(
                self->step > 0 ? reader->first_key : reader->last_key);
            s->unread = 1;
        } else if (read_head(self, i) < 0) {
            return -1;
        }
    }
    self->heap_size = 0;
    for (Py_ssize_t i = 0; i < self->count; i++)
        if (self->sources[i].head != NULL)
            self->heap[self->heap_size++] = i;
    for (Py_ssize_t at = self->heap_size / 2 - 1; at >= 0; at--)
        sift_down(self, at);
    self->started = 1;
    return 0;
}

/* Read the moved root's head and put it in its place: 0, or -1 with an error set. */
static int
settle_root(MergeCursor *self)
{
    if (read_head(self, self->heap[0]) < 0)
        return -1;
    self->root_moved = 0;
    if (self->sources[self->heap[0]].head == NULL)
        self->heap[0] = self->heap[--self->heap_size];
    if (self->heap_size)
        sift_down(self, 0);
    return 0;
}

static PyObject *
next_pair(MergeCursor *self)
{
    Py_ssize_t key_size = self->key_size;
    /* every reader still held (a closed store releases them) before a head is read or
       compared: looked at again only after some reader anywhere let go of its buffer */
    if (self->released_seen != readers_released) {
        for (Py_ssize_t i = self->log_count; i < self->count; i++)
            if (!self->sources[i].reader->held) {
                PyErr_SetString(PyExc_ValueError, "RunReader is released");
                return NULL;
            }
        self->released_seen = readers_released;
    }
    if (!self->started && start(self) < 0)
        return NULL;
    for (;;) {
        if (self->root_moved && settle_root(self) < 0)
            return NULL;
        if (self->heap_size == 0)
            return NULL; /* StopIteration */
        source *winner = &self->sources[self->heap[0]];
        if (winner->unread && read_bound_row(self, self->heap[0]) < 0)
            return NULL;
        const unsigned char *key = winner->head;
        if (self->given && key_order(key, self->key, key_size) == 0) {
            winner->position += self->step; /* shadowed by a newer source's row */
            self->root_moved = 1;
            continue;
        }
        PyObject *key_object = NULL, *value = NULL;
        if (winner->reader == NULL) {
            PyObject *bound = log_value(winner);
            if (bound == NULL)
                return NULL;
            if (bound != Py_None) {
                key_object = Py_NewRef(winner->key_object);
                value = Py_NewRef(bound);
            }
        } else if (winner->state == 1) {
            key_object = PyBytes_FromStringAndSize((const char *)key, key_size);
            value = PyBytes_FromStringAndSize((const char *)key + key_size,
                                              winner->reader->value_size);
            if (key_object == NULL || value == NULL) {
                Py_XDECREF(key_object);
                Py_XDECREF(value);
                return NULL;
            }
        }
        memcpy(self->key, key, (size_t)key_size);
        self->given = 1;
        winner->position += self->step;
        self->root_moved = 1;
        if (key_object == NULL)
            continue; /* a removal */
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(key_object);
            Py_DECREF(value);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, key_object);
        PyTuple_SET_ITEM(pair, 1, value);
        return pair;
    }
}

/* Let go of the sources (at the end, and at clear): the snapshot is freed. */
static void
release_sources(MergeCursor *self)
{
    if (self->pinned) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->readers); i++)
            ((RunReader *)PyTuple_GET_ITEM(self->readers, i))->cursors--;
        self->pinned = 0;
    }
    if (self->sources != NULL)
        for (Py_ssize_t i = 0; i < self->count; i++)
            Py_CLEAR(self->sources[i].key_object);
    PyMem_Free(self->sources);
    PyMem_Free(self->heap);
    self->sources = NULL;
    self->heap = NULL;
    self->count = self->heap_size = 0;
    Py_CLEAR(self->readers);
    Py_CLEAR(self->logs);
}

/* Raise what a handler returned (a new reference, NULL with an error set),
   as `raise error from None`; always NULL. */
static PyObject *
raise_handled(PyObject *error, const char *handler)
{
    if (error == NULL)
        return NULL;
    if (!PyExceptionInstance_Check(error)) {
        PyErr_Format(PyExc_TypeError, "MergeCursor: %s must return an exception", handler);
    } else {
        PyException_SetCause(error, NULL);
        PyErr_SetObject((PyObject *)Py_TYPE(error), error);
    }
    Py_DECREF(error);
    return NULL;
}

/* The next pair, unless closed[0] is set (then on_closed's error); a
   RunCorrupt handed to on_corrupt, which returns the error to raise. At the
   end the sources go, and every later step ends too. */
static PyObject *
cursor_next(MergeCursor *self)
{
    if (self->sources == NULL)
        return NULL; /* ended (or cleared): ends again */
    if (self->closed != Py_None && PyByteArray_AS_STRING(self->closed)[0])
        return raise_handled(PyObject_CallNoArgs(self->on_closed), "on_closed");
    PyObject *pair = next_pair(self);
    if (pair == NULL && !PyErr_Occurred())
        release_sources(self);
    if (pair != NULL || self->on_corrupt == Py_None || !PyErr_ExceptionMatches(RunCorrupt))
        return pair;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    PyObject *error = PyObject_CallOneArg(self->on_corrupt, value);
    Py_XDECREF(value);
    return raise_handled(error, "on_corrupt");
}

static int
cursor_traverse(MergeCursor *self, visitproc visit, void *arg)
{
    Py_VISIT(self->readers);
    Py_VISIT(self->logs);
    Py_VISIT(self->on_corrupt);
    Py_VISIT(self->closed);
    Py_VISIT(self->on_closed);
    return 0;
}

static int
cursor_clear(MergeCursor *self)
{
    release_sources(self);
    Py_CLEAR(self->on_corrupt);
    Py_CLEAR(self->closed);
    Py_CLEAR(self->on_closed);
    return 0;
}

static void
cursor_dealloc(MergeCursor *self)
{
    PyObject_GC_UnTrack(self);
    cursor_clear(self);
    PyMem_Free(self->key);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A bound given as bytes or None: 0, or -1 with TypeError. */
static int
bound_of(PyObject *object, const char **bytes, Py_ssize_t *length)
{
    if (object == Py_None) {
        *bytes = NULL;
        *length = 0;
        return 0;
    }
    if (!PyBytes_Check(object)) {
        PyErr_SetString(PyExc_TypeError, "MergeCursor: start and stop are bytes or None");
        return -1;
    }
    *bytes = PyBytes_AS_STRING(object);
    *length = PyBytes_GET_SIZE(object);
    return 0;
}

/* A run's rows start <= key < stop: low and high, or -1 with RunCorrupt set. */
static int
run_range(RunReader *reader, const char *start, Py_ssize_t start_length, const char *stop,
          Py_ssize_t stop_length, Py_ssize_t *low, Py_ssize_t *high)
{
    *low = start == NULL ? 0
                         : reader_seek_key(reader, (const unsigned char *)start, start_length);
    if (*low < 0)
        return -1;
    *high = stop == NULL ? reader->count
                         : reader_seek_key(reader, (const unsigned char *)stop, stop_length);
    return *high < 0 ? -1 : 0;
}

/* The cursor of MergeCursor's nine arguments (logs, readers, key_size, start,
   stop, reverse, on_corrupt, closed, on_closed), for a call (vectorcall: a
   seek is a few microseconds) and for tp_new alike. */
static PyObject *
cursor_make(PyTypeObject *type, PyObject *const *args)
{
    PyObject *logs = args[0], *readers = args[1], *start_object = args[3],
             *stop_object = args[4], *on_corrupt = args[6], *closed = args[7],
             *on_closed = args[8];
    if (!PyTuple_Check(logs) || !PyTuple_Check(readers)) {
        PyErr_SetString(PyExc_TypeError, "MergeCursor: logs and readers are tuples");
        return NULL;
    }
    Py_ssize_t key_size = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    if (key_size == -1 && PyErr_Occurred())
        return NULL;
    int reverse = PyObject_IsTrue(args[5]);
    if (reverse < 0)
        return NULL;
    if (closed != Py_None &&
        (!PyByteArray_CheckExact(closed) || PyByteArray_GET_SIZE(closed) < 1 ||
         !PyCallable_Check(on_closed))) {
        PyErr_SetString(PyExc_TypeError,
                        "MergeCursor: closed is a bytearray of one byte or more, with a "
                        "callable on_closed, or None");
        return NULL;
    }
    if (on_corrupt != Py_None && !PyCallable_Check(on_corrupt)) {
        PyErr_SetString(PyExc_TypeError, "MergeCursor: on_corrupt is a callable or None");
        return NULL;
    }
    const char *start, *stop;
    Py_ssize_t start_length, stop_length;
    if (bound_of(start_object, &start, &start_length) < 0 ||
        bound_of(stop_object, &stop, &stop_length) < 0 ||
        readers_check(readers, "MergeCursor") < 0)
        return NULL;
    if (key_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "MergeCursor: key_size must be positive");
        return NULL;
    }
    Py_ssize_t log_count = PyTuple_GET_SIZE(logs), run_count = PyTuple_GET_SIZE(readers);
    for (Py_ssize_t i = 0; i < log_count; i++) {
        PyObject *log = PyTuple_GET_ITEM(logs, i);
        if (!PyTuple_Check(log) || PyTuple_GET_SIZE(log) != 2 ||
            !PyDict_Check(PyTuple_GET_ITEM(log, 0)) || !PyList_Check(PyTuple_GET_ITEM(log, 1))) {
            PyErr_SetString(PyExc_TypeError,
                            "MergeCursor: logs must be a tuple of (dict, list of keys)");
            return NULL;
        }
    }
    MergeCursor *self = (MergeCursor *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->readers = Py_NewRef(readers);
    self->logs = Py_NewRef(logs);
    self->on_corrupt = Py_NewRef(on_corrupt);
    self->closed = Py_NewRef(closed);
    self->on_closed = Py_NewRef(on_closed);
    self->key_size = key_size;
    self->step = reverse ? -1 : 1;
    self->count = log_count + run_count;
    self->log_count = log_count;
    self->sources = PyMem_Calloc((size_t)self->count + 1, sizeof(source));
    self->heap = PyMem_Calloc((size_t)self->count + 1, sizeof(Py_ssize_t));
    self->key = PyMem_Malloc((size_t)key_size);
    if (self->sources == NULL || self->heap == NULL || self->key == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    /* (after the allocations, which may run finalizers: from here on nothing does) */
    for (Py_ssize_t i = 0; i < run_count; i++) {
        RunReader *reader = (RunReader *)PyTuple_GET_ITEM(readers, i);
        if (!reader->held || reader->key_size != key_size) {
            PyErr_SetString(PyExc_ValueError, !reader->held
                                                  ? "RunReader is released"
                                                  : "MergeCursor: a reader of another key size");
            Py_DECREF(self);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < run_count; i++)
        ((RunReader *)PyTuple_GET_ITEM(readers, i))->cursors++;
    self->pinned = 1;
    self->released_seen = readers_released; /* every reader held, just seen */
    if (start != NULL)
        prefetch_seeks(readers, (const unsigned char *)start, start_length);
    if (stop != NULL)
        prefetch_seeks(readers, (const unsigned char *)stop, stop_length);
    for (Py_ssize_t i = 0; i < self->count; i++) {
        source *s = &self->sources[i];
        Py_ssize_t low, high;
        if (i < log_count) {
            PyObject *log = PyTuple_GET_ITEM(logs, i);
            s->bindings = PyTuple_GET_ITEM(log, 0);
            s->keys = PyTuple_GET_ITEM(log, 1);
            low = start == NULL ? 0 : bisect_list(s->keys, start, start_length);
            high = stop == NULL ? PyList_GET_SIZE(s->keys)
                                : bisect_list(s->keys, stop, stop_length);
            if (low < 0 || high < 0) {
                Py_DECREF(self);
                return NULL;
            }
        } else {
            s->reader = (RunReader *)PyTuple_GET_ITEM(readers, i - log_count);
            if (run_range(s->reader, start, start_length, stop, stop_length, &low, &high) < 0) {
                note_reader(i - log_count);
                Py_DECREF(self);
                return NULL;
            }
        }
        if (high < low)
            high = low; /* stop before start: nothing */
        s->position = reverse ? high - 1 : low;
        s->limit = reverse ? low - 1 : high;
    }
    return (PyObject *)self;
}

#define CURSOR_ARGUMENTS 9
#define CURSOR_USAGE "MergeCursor takes nine positional arguments, and no keyword argument"

static PyObject *
cursor_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if ((kwnames != NULL && PyTuple_GET_SIZE(kwnames)) ||
        PyVectorcall_NARGS(nargsf) != CURSOR_ARGUMENTS) {
        PyErr_SetString(PyExc_TypeError, CURSOR_USAGE);
        return NULL;
    }
    return cursor_make((PyTypeObject *)type, args);
}

static PyObject *
cursor_create(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if ((kwds != NULL && PyDict_GET_SIZE(kwds)) || PyTuple_GET_SIZE(args) != CURSOR_ARGUMENTS) {
        PyErr_SetString(PyExc_TypeError, CURSOR_USAGE);
        return NULL;
    }
    return cursor_make(type, &PyTuple_GET_ITEM(args, 0));
}

PyTypeObject MergeCursorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._runs.MergeCursor",
    .tp_basicsize = sizeof(MergeCursor),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "MergeCursor(logs, readers, key_size, start, stop, reverse, on_corrupt, closed,\n"
              "on_closed, /): the live (key, value) pairs with start <= key < stop (None:\n"
              "open) in key order (reverse: descending), each key from the newest source\n"
              "holding it. logs: a tuple of (dict, sorted list of its keys), newest first (a\n"
              "None value is a removal); readers: the runs' RunReaders, newest first. A\n"
              "RunCorrupt has the reader's index; while iterating, on_corrupt (unless None)\n"
              "gets it and returns the exception to raise in its place. Once closed[0] (a\n"
              "bytearray, or None) is set, each step raises what on_closed() returns. A\n"
              "released reader raises ValueError.",
    .tp_new = cursor_create,
    .tp_vectorcall = cursor_vectorcall,
    .tp_dealloc = (destructor)cursor_dealloc,
    .tp_traverse = (traverseproc)cursor_traverse,
    .tp_clear = (inquiry)cursor_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)cursor_next,
};
