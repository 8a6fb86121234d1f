/* The C run reader (run_lookup.c), for the module's init (module.c). */

#ifndef L2_RUNS_RUN_LOOKUP_H
#define L2_RUNS_RUN_LOOKUP_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "crc32.h"
#include "format.h"

/* _runs.RunReader: lookups in one mapped run (its state, for the run merge of
   run_writer.c too, which reads the rows of readers). */
typedef struct {
    PyObject_HEAD
    Py_buffer buffer; /* the whole run, while held */
    int held;
    PyObject *removed;   /* what a removal row answers */
    PyObject *first_key; /* bytes: the keys of the first and last rows */
    PyObject *last_key;
    Py_ssize_t key_size, value_size, row_size, count;
    Py_ssize_t filter_at, fence_at, radix_at, rows_at, page_crcs_at; /* offsets */
    uint64_t filter_blocks;
    Py_ssize_t fence_rows, fences; /* rows per fence, fences used */
    Py_ssize_t buckets;            /* 2^radix_bits */
    Py_ssize_t prefix;             /* the radix's prefix length */
    Py_ssize_t shift;
    uint64_t base;
    uint64_t step;          /* a dense run's key spacing (see guess_row), or 0 */
    Py_ssize_t pages;       /* index pages: filter, fences and radix */
    unsigned char *checked; /* one bit a page, set once its checksum held (atomically:
                               count_changes looks up without the GIL) */
    int in_use;             /* count_changes calls using it without the GIL */
    int release_pending;    /* release() was asked meanwhile: done when they end */
    Py_ssize_t cursors;     /* MergeCursors holding it (it cannot be initialized again) */
} RunReader;


/* ------------------------------------------- a run's rows (every C reader of runs) */

/* memcmp's sign for two keys of size bytes, eight bytes at a time (libc's
   memcmp is a call: it was a third of a cursor's step, and of a find's
   bounds tests). */
static inline int
key_order(const unsigned char *a, const unsigned char *b, Py_ssize_t size)
{
    Py_ssize_t at = 0;
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; at + 8 <= size; at += 8) {
        uint64_t x, y;
        memcpy(&x, a + at, 8);
        memcpy(&y, b + at, 8);
        if (x != y)
            return __builtin_bswap64(x) < __builtin_bswap64(y) ? -1 : 1;
    }
#endif
    for (; at < size; at++)
        if (a[at] != b[at])
            return a[at] < b[at] ? -1 : 1;
    return 0;
}

/* Python's comparison of two bytes objects: <0, 0 or >0. */
static inline int
compare(const unsigned char *a, Py_ssize_t a_length, const unsigned char *b,
        Py_ssize_t b_length)
{
    if (a_length == b_length)
        return key_order(a, b, a_length);
    Py_ssize_t common = a_length < b_length ? a_length : b_length;
    int order = common ? memcmp(a, b, (size_t)common) : 0;
    if (order)
        return order;
    return (a_length > b_length) - (a_length < b_length);
}

static inline const unsigned char *
run_bytes(const RunReader *self)
{
    return (const unsigned char *)self->buffer.buf;
}

static inline Py_ssize_t
row_offset(const RunReader *self, Py_ssize_t index)
{
    return self->rows_at + index * self->row_size;
}

/* Run._row's checksum: 1 a value, 2 a removal, 0 a row that fails. */
static inline int
row_state(const RunReader *self, Py_ssize_t index)
{
    uint32_t residue = crc32_of(run_bytes(self) + row_offset(self, index), self->row_size);
    if (residue == RUN_CRC_RESIDUE)
        return 1;
    if (residue == RUN_REMOVAL_RESIDUE)
        return 2;
    return 0;
}

RUNS_INTERNAL extern PyTypeObject RunReaderType;

/* _runs.RunCorrupt(what, offset), created by the module's init. */
RUNS_INTERNAL extern PyObject *RunCorrupt;

/* 0 when readers is a tuple of RunReader; else -1 with TypeError (who: the caller). */
RUNS_INTERNAL int readers_check(PyObject *readers, const char *who);

/* find_first over readers that passed readers_check: a new reference to the
   first answer other than None (a value, or a reader's removed object), to
   None, or NULL with an error (RunCorrupt naming the reader). */
RUNS_INTERNAL PyObject *first_answer(PyObject *readers, const unsigned char *key,
                                     Py_ssize_t length);

/* _runs.count_changes(readers, bindings). */
RUNS_INTERNAL PyObject *runs_count_changes(PyObject *module, PyObject *const *args,
                                           Py_ssize_t nargs);
RUNS_INTERNAL extern const char runs_count_changes_doc[];

/* run.py's _normalized: the 8 bytes after the prefix, zero-padded, big-endian
   (the radix's coordinate of a key, for the reader and the writer alike). */
static inline uint64_t
normalized(const unsigned char *key, Py_ssize_t length, Py_ssize_t prefix)
{
    uint64_t value = 0;
    for (Py_ssize_t i = prefix; i < prefix + 8; i++)
        value = (value << 8) | (i < length ? key[i] : 0);
    return value;
}

/* Run.seek (the key not None): the first row whose key is at least key, or
   -1 with RunCorrupt set. */
RUNS_INTERNAL Py_ssize_t reader_seek_key(RunReader *self, const unsigned char *key,
                                         Py_ssize_t length);

/* Prefetch, for every usable reader of the tuple readers, what its seek of
   key will read (run_cursor.c, before its sources' seeks). */
RUNS_INTERNAL void prefetch_seeks(PyObject *readers, const unsigned char *key,
                                  Py_ssize_t length);

/* Raise RunCorrupt for row index, whose checksum failed (run.py's text and offset). */
RUNS_INTERNAL void row_mismatch(const RunReader *self, Py_ssize_t index);

/* Raise RunCorrupt for row index (the first or last), sound but not holding
   the key the run's header gives for it. */
RUNS_INTERNAL void bound_mismatch(const RunReader *self, Py_ssize_t index);

/* How many readers let go of their buffer so far (with the GIL held): a
   MergeCursor checks its readers again only when this changed. */
RUNS_INTERNAL extern uint64_t readers_released;

/* Name the reader (its place in its tuple) on the RunCorrupt being raised. */
RUNS_INTERNAL void note_reader(Py_ssize_t index);

/* _runs.find_first(readers, key). */
RUNS_INTERNAL PyObject *runs_find_first(PyObject *module, PyObject *const *args,
                                        Py_ssize_t nargs);
RUNS_INTERNAL extern const char runs_find_first_doc[];

#endif
