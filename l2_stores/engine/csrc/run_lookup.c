/* RunReader: lookups in one mapped run, as run.py's Run does them.

   Each method mirrors the Python method of the same meaning (run.py), step
   for step, so that both give the same answer and, on corruption, the same
   error at the same offset:

     find         Run.find          bounds, filter, radix, fences, rows
     seek         Run.seek          (the key not None)
     may_contain  Run.may_contain
     row          Run._checked_row
     check_pages  Run._check_pages

   The reader owns its state: the run's buffer (held from __init__ to
   release() or dealloc) and a bitmap of the index pages whose checksum has
   been checked. It reads no Python attribute. Every method runs with the
   GIL held (a lookup is short) and reads the buffer before it allocates any
   object that the garbage collector tracks, so that no finalizer can run
   release() under it.

   Corruption raises RunCorrupt(what, offset), what one of run.py's texts
   and offset the file offset run.py reports; run.py turns it into
   CannotReadFromStore. Every checksum is CRC-32. Every read lies in
   the buffer: __init__ checks the sections against it and the radix's
   fields against the first and last keys, so that whatever bytes the file
   holds, a lookup reads only its own sections. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "crc32.h"
#include "filter.h"
#include "format.h"
#include "mapping.h"
#include "run_lookup.h"

PyObject *RunCorrupt = NULL;

/* run.py's texts: they reach users in CannotReadFromStore. */
static const char PAGE_MISMATCH[] = "run index page checksum mismatch";
static const char ROW_MISMATCH[] = "run row checksum mismatch";
static const char RADIX_RANGE[] = "run radix entry out of range";
static const char FENCES_SHORT[] = "run fences do not cover their rows";
static const char BOUND_MISMATCH[] = "run row key differs from the header's first or last key";


/* ------------------------------------------------------------------ bytes */

/* Python's a // b for b > 0. */
static inline Py_ssize_t
floor_div(Py_ssize_t a, Py_ssize_t b)
{
    Py_ssize_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* Where a lookup without the GIL (count_changes) records the corruption it
   meets, for its caller to raise once it holds the GIL again. */
typedef struct {
    const char *what;
    Py_ssize_t offset;
} run_fault;

static _Thread_local run_fault *gil_free_fault;

static void
corrupt(const char *what, Py_ssize_t offset)
{
    if (gil_free_fault != NULL) {
        gil_free_fault->what = what;
        gil_free_fault->offset = offset;
        return;
    }
    PyObject *args = Py_BuildValue("(sn)", what, offset);
    if (args != NULL) {
        PyErr_SetObject(RunCorrupt, args);
        Py_DECREF(args);
    }
}

/* ------------------------------------------------------------ the lookup */

static inline const unsigned char *
first_key(const RunReader *self)
{
    return (const unsigned char *)PyBytes_AS_STRING(self->first_key);
}

static inline const unsigned char *
last_key(const RunReader *self)
{
    return (const unsigned char *)PyBytes_AS_STRING(self->last_key);
}

/* Run._check_pages: check once every index page holding bytes start .. end
   (filter_at <= start <= end <= rows_at). 0, or -1 with RunCorrupt set. */
static int
check_pages(RunReader *self, Py_ssize_t start, Py_ssize_t end)
{
    Py_ssize_t first = floor_div(start - self->filter_at, RUN_PAGE);
    Py_ssize_t last = floor_div(end - 1 - self->filter_at, RUN_PAGE);
    const unsigned char *run = run_bytes(self);
    for (Py_ssize_t page = first; page <= last; page++) {
        unsigned char bit = (unsigned char)(1u << (page & 7));
        if (__atomic_load_n(&self->checked[page >> 3], __ATOMIC_RELAXED) & bit)
            continue;
        Py_ssize_t low = self->filter_at + page * RUN_PAGE;
        Py_ssize_t high = low + RUN_PAGE < self->rows_at ? low + RUN_PAGE : self->rows_at;
        uint32_t stored = read_u32(run + self->page_crcs_at + page * RUN_CRC_SIZE);
        if (crc32_of(run + low, high - low) != stored) {
            corrupt(PAGE_MISMATCH, low);
            return -1;
        }
        __atomic_fetch_or(&self->checked[page >> 3], bit, __ATOMIC_RELAXED);
    }
    return 0;
}

void
row_mismatch(const RunReader *self, Py_ssize_t index)
{
    corrupt(ROW_MISMATCH, row_offset(self, index));
}

void
bound_mismatch(const RunReader *self, Py_ssize_t index)
{
    corrupt(BOUND_MISMATCH, row_offset(self, index));
}

/* Run.may_contain: 1, 0, or -1 with RunCorrupt set. */
static int
may_contain(RunReader *self, filter_probes probes)
{
    Py_ssize_t start =
        self->filter_at +
        (Py_ssize_t)filter_block(probes, self->filter_blocks) * FILTER_BLOCK_BYTES;
    if (check_pages(self, start, start + FILTER_BLOCK_BYTES) < 0)
        return -1;
    return filter_block_test(run_bytes(self) + start, probes);
}

/* The radix bucket of a key with first key <= key <= last key (__init__
   checked that it is one of the table's, below buckets). */
static inline uint64_t
bucket_of(const RunReader *self, const unsigned char *key, Py_ssize_t length)
{
    uint64_t value = normalized(key, length, self->prefix);
    return value < self->base ? UINT64_MAX
           : self->shift >= 64 ? 0
                               : (value - self->base) >> self->shift;
}

/* Run._fence_of then Run._rows_of_fence: the rows low .. high of the fence
   of a key with first key <= key <= last key. 0, or -1 with RunCorrupt set. */
static int
rows_of_key(RunReader *self, const unsigned char *key, Py_ssize_t length, Py_ssize_t *low_row,
            Py_ssize_t *high_row)
{
    const unsigned char *run = run_bytes(self);
    uint64_t bucket = bucket_of(self, key, length);
    if (bucket >= (uint64_t)self->buckets) { /* never (the test only guards reads) */
        corrupt(RADIX_RANGE, self->radix_at);
        return -1;
    }
    Py_ssize_t entry = self->radix_at + (Py_ssize_t)bucket * RUN_RADIX_ENTRY;
    if (check_pages(self, entry, entry + RUN_RADIX_ENTRY) < 0)
        return -1;
    uint32_t low = read_u32(run + entry);
    if (check_pages(self, entry + RUN_RADIX_ENTRY, entry + 2 * RUN_RADIX_ENTRY) < 0)
        return -1;
    uint32_t high = read_u32(run + entry + RUN_RADIX_ENTRY);
    if (!(low <= high && (Py_ssize_t)high <= self->fences)) {
        corrupt(RADIX_RANGE, entry);
        return -1;
    }
    Py_ssize_t key_size = self->key_size;
    if (high > low && check_pages(self, self->fence_at + (Py_ssize_t)low * key_size,
                                  self->fence_at + (Py_ssize_t)high * key_size) < 0)
        return -1;
    /* bisect_right(fences, key, low, high) - 1 */
    Py_ssize_t lo = low, hi = high;
    while (lo < hi) {
        Py_ssize_t middle = (lo + hi) / 2;
        if (compare(key, length, run + self->fence_at + middle * key_size, key_size) < 0)
            hi = middle;
        else
            lo = middle + 1;
    }
    Py_ssize_t fence = lo - 1;
    if (fence < 0) {
        corrupt(FENCES_SHORT, self->fence_at);
        return -1;
    }
    Py_ssize_t end = (fence + 1) * self->fence_rows;
    *low_row = fence * self->fence_rows;
    *high_row = end < self->count ? end : self->count;
    return 0;
}

/* Ask for rows low .. high (a fence's: 4 KiB at most, unless one row is
   more) to be brought into the cache at once, not one after the other. */
static inline void
prefetch_rows(const RunReader *self, Py_ssize_t low, Py_ssize_t high)
{
#if defined(__GNUC__)
    const unsigned char *run = run_bytes(self);
    Py_ssize_t end = row_offset(self, high);
    if (end - row_offset(self, low) > 2 * RUN_PAGE)
        end = row_offset(self, low) + 2 * RUN_PAGE;
    for (Py_ssize_t at = row_offset(self, low); at < end; at += 64)
        __builtin_prefetch(run + at, 0, 0);
#else
    (void)self, (void)low, (void)high;
#endif
}

/* Run._bisect_keys: the first row of low .. high whose key is at least key,
   comparing keys alone (no checksum): where the deciding rows lie. */
static Py_ssize_t
bisect_keys(const RunReader *self, const unsigned char *key, Py_ssize_t length, Py_ssize_t low,
            Py_ssize_t high)
{
    const unsigned char *run = run_bytes(self);
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (compare(run + row_offset(self, middle), self->key_size, key, length) < 0)
            low = middle + 1;
        else
            high = middle;
    }
    return low;
}

/* Run._decide: what rows index - 1 and index prove of key, checking both
   checksums: 1 row index holds key's value, 2 its removal, 0 key is absent
   (two sound adjacent rows enclose it), -1 nothing (a row fails, or the
   keys disagree with the bisect: the careful search decides). */
static int
decide(const RunReader *self, const unsigned char *key, Py_ssize_t length, Py_ssize_t index)
{
    if (index >= self->count)
        return -1;
    const unsigned char *run = run_bytes(self);
    int state = row_state(self, index);
    if (!state)
        return -1;
    int order = compare(run + row_offset(self, index), self->key_size, key, length);
    if (order == 0)
        return state;
    if (order < 0 || index == 0 || !row_state(self, index - 1) ||
        compare(run + row_offset(self, index - 1), self->key_size, key, length) >= 0)
        return -1;
    return 0;
}

/* Run._bound_proven: whether rows index - 1 and index, both sound, prove
   index the first row whose key is at least key (row index's key at least
   key, row index - 1's below it; a row past either end needs no proof). */
static int
bound_proven(const RunReader *self, const unsigned char *key, Py_ssize_t length, Py_ssize_t index)
{
    const unsigned char *run = run_bytes(self);
    if (index < self->count &&
        (!row_state(self, index) ||
         compare(run + row_offset(self, index), self->key_size, key, length) < 0))
        return 0;
    return index == 0 || (row_state(self, index - 1) &&
                          compare(run + row_offset(self, index - 1), self->key_size, key,
                                  length) < 0);
}

/* Run._lower_bound: bisect_keys checking every row it compares, for when
   decide could not (a corrupt key must not steer the search); *seen,
   *seen_state: the last row it checked and what it holds (-1: none). 0, or
   -1 with RunCorrupt set at the first row that fails. */
static int
lower_bound(const RunReader *self, const unsigned char *key, Py_ssize_t length, Py_ssize_t low,
            Py_ssize_t high, Py_ssize_t *index, Py_ssize_t *seen, int *seen_state)
{
    const unsigned char *run = run_bytes(self);
    *seen = -1;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        int state = row_state(self, middle);
        if (!state) {
            corrupt(ROW_MISMATCH, row_offset(self, middle));
            return -1;
        }
        *seen = middle;
        *seen_state = state;
        if (compare(run + row_offset(self, middle), self->key_size, key, length) < 0)
            low = middle + 1;
        else
            high = middle;
    }
    *index = low;
    return 0;
}

/* Whether key lies between the run's first and last keys. */
static inline int
within_bounds(const RunReader *self, const unsigned char *key, Py_ssize_t length)
{
    return compare(key, length, first_key(self), self->key_size) >= 0 &&
           compare(key, length, last_key(self), self->key_size) <= 0;
}

/* A dense run (a counter's keys: the radix coordinate of row i is base +
   i * step) is found without its radix and fences: the row a key would
   have is computed, then proven (decide, bound_proven: two sound rows
   enclosing it) or, when the run is not as dense as it looked, searched
   for the usual way. The guess is a hint, never an answer. */
static inline Py_ssize_t
guess_row(const RunReader *self, const unsigned char *key, Py_ssize_t length)
{
    uint64_t offset = normalized(key, length, self->prefix) - self->base;
    uint64_t row = offset / self->step + (offset % self->step != 0);
    return row < (uint64_t)self->count ? (Py_ssize_t)row : self->count - 1;
}

/* The step of a run whose sampled fences (RUN_DENSE_SAMPLES + 1, both ends)
   all sit where step puts them, else 0. Reads fence keys unchecked: the
   step only chooses where a lookup looks first. */
static uint64_t
dense_step(const RunReader *self)
{
    if (self->count < 2 || self->prefix >= self->key_size)
        return 0;
    uint64_t span = normalized((const unsigned char *)PyBytes_AS_STRING(self->last_key),
                               self->key_size, self->prefix) - self->base;
    if (span == 0 || span % (uint64_t)(self->count - 1))
        return 0;
    uint64_t step = span / (uint64_t)(self->count - 1);
    const unsigned char *first = (const unsigned char *)PyBytes_AS_STRING(self->first_key);
    for (Py_ssize_t i = 0; i <= RUN_DENSE_SAMPLES; i++) {
        Py_ssize_t fence = (self->fences - 1) * i / RUN_DENSE_SAMPLES;
        const unsigned char *fence_key = run_bytes(self) + self->fence_at + fence * self->key_size;
        uint64_t row = (uint64_t)(fence * self->fence_rows);
        if ((self->prefix && memcmp(fence_key, first, (size_t)self->prefix) != 0) ||
            normalized(fence_key, self->key_size, self->prefix) - self->base != row * step)
            return 0;
    }
    return step;
}

/* Run.find's steps, without allocating: 1 the run holds key's value (at
   row *found), 2 its removal, 0 nothing of key, -1 corruption (reported by
   corrupt). Needs no GIL when corrupt records (count_changes). */
static int
lookup_within(RunReader *self, const unsigned char *key, Py_ssize_t length, filter_probes probes,
              Py_ssize_t *found)
{
    int maybe = may_contain(self, probes);
    if (maybe <= 0)
        return maybe;
    Py_ssize_t low, high, index, seen;
    if (self->step) {
        index = guess_row(self, key, length);
        int state = decide(self, key, length, index);
        if (state > 0)
            *found = index;
        if (state >= 0)
            return state;
    }
    if (rows_of_key(self, key, length, &low, &high) < 0)
        return -1;
    prefetch_rows(self, low, high);
    index = bisect_keys(self, key, length, low, high);
    int state = decide(self, key, length, index);
    if (state < 0) {
        int seen_state = 0;
        if (lower_bound(self, key, length, low, high, &index, &seen, &seen_state) < 0)
            return -1;
        if (index == high)
            return 0;
        state = index == seen ? seen_state : row_state(self, index);
        if (!state) {
            corrupt(ROW_MISMATCH, row_offset(self, index));
            return -1;
        }
    }
    const unsigned char *row = run_bytes(self) + row_offset(self, index);
    if (!state || length != self->key_size || memcmp(row, key, (size_t)length) != 0)
        return 0;
    *found = index;
    return state;
}

static int
lookup_state(RunReader *self, const unsigned char *key, Py_ssize_t length, filter_probes probes,
             Py_ssize_t *found)
{
    if (!self->count || !within_bounds(self, key, length))
        return 0;
    return lookup_within(self, key, length, probes, found);
}

/* What lookup_state's state and row answer: a new reference to the value,
   removed or None; NULL with an error set (state -1: RunCorrupt). */
static PyObject *
answer(const RunReader *self, int state, Py_ssize_t index)
{
    if (state < 0)
        return NULL;
    if (state == 0)
        Py_RETURN_NONE;
    if (state == 2)
        return Py_NewRef(self->removed);
    const unsigned char *row = run_bytes(self) + row_offset(self, index);
    return PyBytes_FromStringAndSize((const char *)row + self->key_size, self->value_size);
}

/* Run.find: a new reference to the value, removed or None; NULL with an
   error set. */
static PyObject *
lookup(RunReader *self, const unsigned char *key, Py_ssize_t length, filter_probes probes)
{
    Py_ssize_t index = 0;
    int state = lookup_state(self, key, length, probes, &index);
    return answer(self, state, index);
}

Py_ssize_t
reader_seek_key(RunReader *self, const unsigned char *key, Py_ssize_t length)
{
    Py_ssize_t key_size = self->key_size;
    if (!self->count || compare(key, length, first_key(self), key_size) <= 0)
        return 0;
    if (compare(key, length, last_key(self), key_size) > 0)
        return self->count;
    Py_ssize_t low, high, index, seen;
    int seen_state;
    if (self->step) {
        index = guess_row(self, key, length);
        if (bound_proven(self, key, length, index))
            return index;
    }
    if (rows_of_key(self, key, length, &low, &high) < 0)
        return -1;
    prefetch_rows(self, low, high);
    index = bisect_keys(self, key, length, low, high);
    if (bound_proven(self, key, length, index))
        return index;
    if (lower_bound(self, key, length, low, high, &index, &seen, &seen_state) < 0)
        return -1;
    return index;
}

/* Ask for the memory of every reader's seek of key at once, a stage at a
   time (the radix entries; then the fences they name; then the middle rows
   of the fence each bisect lands in), so that a cursor's seeks among runs
   that all hold keys near key (random keys) wait for three misses, not
   three a run. The bytes read here, unchecked, only aim prefetches:
   reader_seek_key then seeks each run and checks what it reads. */
void
prefetch_seeks(PyObject *readers, const unsigned char *key, Py_ssize_t length)
{
#if defined(__GNUC__)
    enum { MAX_READERS = 64 };
    Py_ssize_t n = PyTuple_GET_SIZE(readers);
    Py_ssize_t entries[MAX_READERS];
    if (n > MAX_READERS)
        n = MAX_READERS;
    for (Py_ssize_t i = 0; i < n; i++) { /* the radix entries, or a dense run's row */
        RunReader *r = (RunReader *)PyTuple_GET_ITEM(readers, i);
        entries[i] = -1;
        if (!r->held || !r->count || compare(key, length, first_key(r), r->key_size) <= 0 ||
            compare(key, length, last_key(r), r->key_size) > 0)
            continue;
        if (r->step) {
            __builtin_prefetch(run_bytes(r) + row_offset(r, guess_row(r, key, length)), 0, 0);
            continue;
        }
        uint64_t bucket = bucket_of(r, key, length);
        if (bucket < (uint64_t)r->buckets) {
            entries[i] = r->radix_at + (Py_ssize_t)bucket * RUN_RADIX_ENTRY;
            __builtin_prefetch(run_bytes(r) + entries[i], 0, 0);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* the bucket's fences (the first two lines) */
        RunReader *r = (RunReader *)PyTuple_GET_ITEM(readers, i);
        if (entries[i] < 0)
            continue;
        uint32_t low = read_u32(run_bytes(r) + entries[i]);
        if (low >= (uint32_t)r->fences)
            continue;
        const unsigned char *fences = run_bytes(r) + r->fence_at + (Py_ssize_t)low * r->key_size;
        __builtin_prefetch(fences, 0, 0);
        if (low + 1 < (uint32_t)r->fences)
            __builtin_prefetch(fences + 64, 0, 0);
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* the fence's middle rows */
        RunReader *r = (RunReader *)PyTuple_GET_ITEM(readers, i);
        if (entries[i] < 0)
            continue;
        const unsigned char *run = run_bytes(r);
        uint32_t low = read_u32(run + entries[i]);
        uint32_t high = read_u32(run + entries[i] + RUN_RADIX_ENTRY);
        if (!(low <= high && (Py_ssize_t)high <= r->fences))
            continue;
        Py_ssize_t lo = low, hi = high; /* bisect_right - 1, as rows_of_key */
        while (lo < hi) {
            Py_ssize_t middle = (lo + hi) / 2;
            if (compare(key, length, run + r->fence_at + middle * r->key_size, r->key_size) < 0)
                hi = middle;
            else
                lo = middle + 1;
        }
        if (lo < 1)
            continue;
        Py_ssize_t first = (lo - 1) * r->fence_rows, end = first + r->fence_rows;
        if (end > r->count)
            end = r->count;
        Py_ssize_t rows = end - first;
        __builtin_prefetch(run + row_offset(r, first + rows / 2), 0, 0);
        __builtin_prefetch(run + row_offset(r, first + rows / 4), 0, 0);
        __builtin_prefetch(run + row_offset(r, first + 3 * rows / 4), 0, 0);
    }
#else
    (void)readers, (void)key, (void)length;
#endif
}

/* ------------------------------------------------------------ the type */

uint64_t readers_released = 0;

/* Let go of the run's buffer (the mapping can then be closed). */
static void
release_buffer(RunReader *self)
{
    if (self->held) {
        self->held = 0;
        readers_released++;
        PyBuffer_Release(&self->buffer);
    }
}

static void
reader_clear_state(RunReader *self)
{
    release_buffer(self);
    Py_CLEAR(self->removed);
    Py_CLEAR(self->first_key);
    Py_CLEAR(self->last_key);
    PyMem_Free(self->checked);
    self->checked = NULL;
    self->step = 0;
}

static int
reader_traverse(RunReader *self, visitproc visit, void *arg)
{
    Py_VISIT(self->removed);
    Py_VISIT(self->first_key);
    Py_VISIT(self->last_key);
    if (self->held)
        Py_VISIT(self->buffer.obj);
    return 0;
}

static int
reader_clear(RunReader *self)
{
    reader_clear_state(self);
    return 0;
}

static void
reader_dealloc(RunReader *self)
{
    PyObject_GC_UnTrack(self);
    reader_clear_state(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Whether count items of size bytes from at lie in 0 .. limit (no overflow). */
static int
span_ok(Py_ssize_t at, Py_ssize_t count, Py_ssize_t size, Py_ssize_t limit)
{
    return at >= 0 && at <= limit && count >= 0 && size >= 0 &&
           (size == 0 || count <= (limit - at) / size);
}

static int
reader_init(RunReader *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"buffer",      "removed",    "key_size",     "value_size",
                               "count",       "filter_offset", "filter_blocks", "fence_offset",
                               "fence_rows",  "fences",     "radix_offset", "radix_bits",
                               "rows_offset", "page_crcs_offset", "prefix",  "shift",
                               "base",        "first_key",  "last_key",     NULL};
    PyObject *buffer, *removed, *base_object, *first, *last;
    Py_ssize_t key_size, value_size, count, filter_at, blocks, fence_at, fence_rows, fences;
    Py_ssize_t radix_at, radix_bits, rows_at, page_crcs_at, prefix, shift;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnnnnnnnnnnnnnnOSS:RunReader", keywords,
                                     &buffer, &removed, &key_size, &value_size, &count,
                                     &filter_at, &blocks, &fence_at, &fence_rows, &fences,
                                     &radix_at, &radix_bits, &rows_at, &page_crcs_at, &prefix,
                                     &shift, &base_object, &first, &last))
        return -1;
    if (self->in_use || self->cursors) { /* count_changes or a cursor reads its state */
        PyErr_SetString(PyExc_ValueError, "RunReader: in use, cannot be initialized again");
        return -1;
    }
    reader_clear_state(self);
    if (!PyLong_Check(base_object)) {
        PyErr_SetString(PyExc_TypeError, "RunReader: base must be an int");
        return -1;
    }
    unsigned long long base = PyLong_AsUnsignedLongLong(base_object);
    if (base == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (key_size < 0 || value_size < 0 || count < 0 || blocks < 1 ||
        (uint64_t)blocks > ((uint64_t)1 << 32) || fence_rows < 1 || radix_bits < 0 ||
        radix_bits > RUN_MAX_RADIX_BITS || prefix < 0 || prefix > key_size || shift < 0 ||
        key_size > PY_SSIZE_T_MAX / 4 || value_size > PY_SSIZE_T_MAX / 4 ||
        fences != count / fence_rows + (count % fence_rows != 0)) {
        PyErr_SetString(PyExc_ValueError, "RunReader: parameters out of range");
        return -1;
    }
    Py_ssize_t row_size = key_size + value_size + RUN_CRC_SIZE;
    Py_ssize_t buckets = (Py_ssize_t)1 << radix_bits;
    if (PyObject_GetBuffer(buffer, &self->buffer, PyBUF_SIMPLE) < 0)
        return -1;
    self->held = 1;
    Py_ssize_t size = self->buffer.len;
    /* filter, fences, radix, rows and page checksums, in this order, inside
       the buffer; the filter starts past the headers */
    Py_ssize_t pages = rows_at >= filter_at ? (rows_at - filter_at + RUN_PAGE - 1) / RUN_PAGE : 0;
    if (filter_at < RUN_FILTER_OFFSET || !span_ok(filter_at, blocks, FILTER_BLOCK_BYTES, fence_at) ||
        !span_ok(fence_at, fences, key_size, radix_at) ||
        !span_ok(radix_at, buckets + 1, RUN_RADIX_ENTRY, rows_at) ||
        !span_ok(rows_at, count, row_size, page_crcs_at) ||
        !span_ok(page_crcs_at, pages, RUN_CRC_SIZE, size)) {
        reader_clear_state(self);
        PyErr_SetString(PyExc_ValueError, "RunReader: sections outside the buffer");
        return -1;
    }
    /* the bounds, and the radix's fields against them (run.py's load checks
       the same): every key between them falls in a bucket of the table */
    if (count > 0) {
        const unsigned char *low = (const unsigned char *)PyBytes_AS_STRING(first);
        const unsigned char *high = (const unsigned char *)PyBytes_AS_STRING(last);
        uint64_t span = 0;
        int fits = PyBytes_GET_SIZE(first) == key_size && PyBytes_GET_SIZE(last) == key_size &&
                   compare(low, key_size, high, key_size) <= 0 &&
                   (prefix == 0 || memcmp(low, high, (size_t)prefix) == 0) &&
                   normalized(low, key_size, prefix) == base;
        if (fits) {
            span = normalized(high, key_size, prefix) - base;
            fits = (shift >= 64 ? 0 : span >> shift) < (uint64_t)buckets;
        }
        if (!fits) {
            reader_clear_state(self);
            PyErr_SetString(PyExc_ValueError,
                            "RunReader: the radix's fields disagree with the first and last keys");
            return -1;
        }
    }
    self->checked = PyMem_Calloc((size_t)(pages / 8 + 1), 1);
    if (self->checked == NULL) {
        reader_clear_state(self);
        PyErr_NoMemory();
        return -1;
    }
    self->removed = Py_NewRef(removed);
    self->first_key = Py_NewRef(first);
    self->last_key = Py_NewRef(last);
    self->key_size = key_size;
    self->value_size = value_size;
    self->row_size = row_size;
    self->count = count;
    self->filter_at = filter_at;
    self->fence_at = fence_at;
    self->radix_at = radix_at;
    self->rows_at = rows_at;
    self->page_crcs_at = page_crcs_at;
    self->filter_blocks = (uint64_t)blocks;
    self->fence_rows = fence_rows;
    self->fences = fences;
    self->buckets = buckets;
    self->prefix = prefix;
    self->shift = shift;
    self->base = base;
    self->pages = pages;
    self->step = dense_step(self);
    return 0;
}

static int
usable(RunReader *self)
{
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "RunReader is released");
        return 0;
    }
    return 1;
}

static int
key_bytes(PyObject *key, const unsigned char **bytes, Py_ssize_t *length)
{
    if (!PyBytes_Check(key)) {
        PyErr_Format(PyExc_TypeError, "a run's key is bytes, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
    *bytes = (const unsigned char *)PyBytes_AS_STRING(key);
    *length = PyBytes_GET_SIZE(key);
    return 0;
}

static int
key_hash_of(PyObject *value, uint64_t *hash)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "a key hash is an int, not %.100s", Py_TYPE(value)->tp_name);
        return -1;
    }
    unsigned long long hashed = PyLong_AsUnsignedLongLong(value);
    if (hashed == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *hash = hashed;
    return 0;
}

static PyObject *
reader_find(RunReader *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "find(key, key_hash=None, /)");
        return NULL;
    }
    const unsigned char *key;
    Py_ssize_t length;
    uint64_t hash;
    if (!usable(self) || key_bytes(args[0], &key, &length) < 0)
        return NULL;
    if (nargs == 1 || args[1] == Py_None)
        hash = crc32_of(key, length);
    else if (key_hash_of(args[1], &hash) < 0)
        return NULL;
    return lookup(self, key, length, filter_probes_of(hash));
}

static PyObject *
reader_seek(RunReader *self, PyObject *key_object)
{
    const unsigned char *key;
    Py_ssize_t length;
    if (!usable(self) || key_bytes(key_object, &key, &length) < 0)
        return NULL;
    Py_ssize_t index = reader_seek_key(self, key, length);
    return index < 0 ? NULL : PyLong_FromSsize_t(index);
}

static PyObject *
reader_may_contain(RunReader *self, PyObject *hash_object)
{
    uint64_t hash;
    if (!usable(self) || key_hash_of(hash_object, &hash) < 0)
        return NULL;
    int maybe = may_contain(self, filter_probes_of(hash));
    return maybe < 0 ? NULL : PyBool_FromLong(maybe);
}

static PyObject *
reader_row(RunReader *self, PyObject *index_object)
{
    if (!usable(self))
        return NULL;
    Py_ssize_t index = PyNumber_AsSsize_t(index_object, PyExc_IndexError);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index < 0 || index >= self->count) {
        PyErr_SetString(PyExc_IndexError, "run row index out of range");
        return NULL;
    }
    int state = row_state(self, index);
    if (!state) {
        corrupt(ROW_MISMATCH, row_offset(self, index));
        return NULL;
    }
    const char *row = (const char *)run_bytes(self) + row_offset(self, index);
    /* bytes first (not tracked by the collector), the tuple last */
    PyObject *key = PyBytes_FromStringAndSize(row, self->key_size);
    PyObject *value = state == 2 ? Py_NewRef(self->removed)
                                 : PyBytes_FromStringAndSize(row + self->key_size,
                                                             self->value_size);
    PyObject *pair = key != NULL && value != NULL ? PyTuple_Pack(2, key, value) : NULL;
    Py_XDECREF(key);
    Py_XDECREF(value);
    return pair;
}

static PyObject *
reader_check_pages(RunReader *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "check_pages(start, end, /)");
        return NULL;
    }
    if (!usable(self))
        return NULL;
    Py_ssize_t start = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t end = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    if (!(self->filter_at <= start && start <= end && end <= self->rows_at)) {
        PyErr_SetString(PyExc_ValueError, "check_pages: bytes outside the index sections");
        return NULL;
    }
    if (check_pages(self, start, end) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
reader_page_checked(RunReader *self, PyObject *page_object)
{
    if (!usable(self))
        return NULL;
    Py_ssize_t page = PyNumber_AsSsize_t(page_object, PyExc_IndexError);
    if (page == -1 && PyErr_Occurred())
        return NULL;
    if (page < 0 || page >= self->pages) {
        PyErr_SetString(PyExc_IndexError, "run index page out of range");
        return NULL;
    }
    return PyBool_FromLong((__atomic_load_n(&self->checked[page >> 3], __ATOMIC_RELAXED) >>
                            (page & 7)) & 1);
}

static PyObject *
reader_dense_step(RunReader *self, PyObject *Py_UNUSED(ignored))
{
    if (!usable(self))
        return NULL;
    return PyLong_FromUnsignedLongLong(self->step);
}

static PyObject *
reader_release(RunReader *self, PyObject *Py_UNUSED(ignored))
{
    if (self->in_use) /* count_changes reads it without the GIL: it releases it */
        self->release_pending = 1;
    else
        release_buffer(self);
    Py_RETURN_NONE;
}

static PyMethodDef reader_methods[] = {
    {"find", (PyCFunction)(void (*)(void))reader_find, METH_FASTCALL,
     "find(key, key_hash=None, /) -> value | removed | None: what the run holds for key\n"
     "(key_hash: zlib.crc32(key), computed when None)."},
    {"seek", (PyCFunction)reader_seek, METH_O,
     "seek(key, /) -> int: the index of the first row whose key is at least key."},
    {"may_contain", (PyCFunction)reader_may_contain, METH_O,
     "may_contain(key_hash, /) -> bool: False when the filter proves no key has that CRC-32."},
    {"row", (PyCFunction)reader_row, METH_O,
     "row(index, /) -> (key, value | removed): row index, its checksum checked."},
    {"check_pages", (PyCFunction)(void (*)(void))reader_check_pages, METH_FASTCALL,
     "check_pages(start, end, /): check once every index page holding bytes start .. end."},
    {"page_checked", (PyCFunction)reader_page_checked, METH_O,
     "page_checked(page, /) -> bool: whether index page's checksum was checked."},
    {"dense_step", (PyCFunction)reader_dense_step, METH_NOARGS,
     "dense_step() -> int: the key spacing lookups guess rows by (Run.dense_step), or 0."},
    {"release", (PyCFunction)reader_release, METH_NOARGS,
     "Let go of the buffer (the run's mapping can then be closed); calls raise ValueError."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject RunReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._runs.RunReader",
    .tp_basicsize = sizeof(RunReader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "RunReader(buffer, removed, key_size, value_size, count, filter_offset, "
              "filter_blocks, fence_offset, fence_rows, fences, radix_offset, radix_bits, "
              "rows_offset, page_crcs_offset, prefix, shift, base, first_key, last_key)\n\n"
              "Lookups in one mapped run, as run.Run does them.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_traverse = (traverseproc)reader_traverse,
    .tp_clear = (inquiry)reader_clear,
    .tp_methods = reader_methods,
};

/* ------------------------------------------------------------ find_first */

void
note_reader(Py_ssize_t index)
{
    if (!PyErr_ExceptionMatches(RunCorrupt))
        return;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyObject *at = PyLong_FromSsize_t(index);
    if (at == NULL || value == NULL || PyObject_SetAttrString(value, "index", at) < 0)
        PyErr_Clear(); /* the corruption is still the error to raise */
    Py_XDECREF(at);
    PyErr_Restore(type, value, traceback);
}

const char runs_find_first_doc[] =
    "find_first(readers, key, /) -> value | removed | None: the first answer other than None\n"
    "of the readers (a tuple, newest run first) for key. The key's CRC-32 is computed once\n"
    "and every reader's filter block is prefetched before the first probe. A RunCorrupt\n"
    "it raises has an index attribute: the reader's place in the tuple.";

int
readers_check(PyObject *readers, const char *who)
{
    if (!PyTuple_Check(readers)) {
        PyErr_Format(PyExc_TypeError, "%s: readers must be a tuple of RunReader", who);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(readers); i++)
        if (!PyObject_TypeCheck(PyTuple_GET_ITEM(readers, i), &RunReaderType)) {
            PyErr_Format(PyExc_TypeError, "%s: readers must be a tuple of RunReader", who);
            return -1;
        }
    return 0;
}

/* Whether every reader of a tuple that passed readers_check holds its
   buffer; else 0 with ValueError. */
static int
readers_usable(PyObject *readers)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(readers); i++)
        if (!usable((RunReader *)PyTuple_GET_ITEM(readers, i)))
            return 0;
    return 1;
}

/* The first answer of the readers (newest first) for key, as lookup_state
   gives it (the state; the reader at *at, the row at *row), every reader's
   filter block prefetched before the first probe; -1 with *at the reader
   that failed. Needs no GIL when corrupt records (count_changes). */
static int
first_state(PyObject *readers, const unsigned char *key, Py_ssize_t length, Py_ssize_t *at,
            Py_ssize_t *row)
{
    enum { REMEMBERED = 64 }; /* runs whose bounds test is kept for the second pass */
    unsigned char inside[REMEMBERED];
    Py_ssize_t n = PyTuple_GET_SIZE(readers);
    filter_probes probes = filter_probes_of(crc32_of(key, length));
    for (Py_ssize_t i = 0; i < n; i++) {
        RunReader *reader = (RunReader *)PyTuple_GET_ITEM(readers, i);
        int in = reader->count && within_bounds(reader, key, length);
        if (i < REMEMBERED)
            inside[i] = (unsigned char)in;
        if (in)
            filter_prefetch(run_bytes(reader) + reader->filter_at, reader->filter_blocks, probes);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        RunReader *reader = (RunReader *)PyTuple_GET_ITEM(readers, i);
        int state = i < REMEMBERED ? (inside[i] ? lookup_within(reader, key, length, probes, row)
                                                : 0)
                                   : lookup_state(reader, key, length, probes, row);
        if (state != 0) {
            *at = i;
            return state;
        }
    }
    return 0;
}

PyObject *
first_answer(PyObject *readers, const unsigned char *key, Py_ssize_t length)
{
    if (!readers_usable(readers))
        return NULL;
    Py_ssize_t at = 0, row = 0;
    int state = first_state(readers, key, length, &at, &row);
    if (state < 0) {
        note_reader(at);
        return NULL;
    }
    if (state == 0)
        Py_RETURN_NONE;
    /* (held: an answer allocates only bytes, which run no finalizer) */
    return answer((RunReader *)PyTuple_GET_ITEM(readers, at), state, row);
}

PyObject *
runs_find_first(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "find_first(readers, key, /)");
        return NULL;
    }
    const unsigned char *key;
    Py_ssize_t length;
    if (readers_check(args[0], "find_first") < 0 || key_bytes(args[1], &key, &length) < 0)
        return NULL;
    return first_answer(args[0], key, length);
}

/* ---------------------------------------------------------- count_changes */

const char runs_count_changes_doc[] =
    "count_changes(readers, bindings, /) -> int: how many more live keys the runs (a tuple,\n"
    "newest first) hold with bindings (a dict: key -> value, or None for a removal) on top:\n"
    "for each key, 1 if its value is not None, less 1 if the runs hold a value for it. The\n"
    "lookups run without the GIL. A RunCorrupt it raises has the reader's index.";

PyObject *
runs_count_changes(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "count_changes(readers, bindings: dict, /)");
        return NULL;
    }
    PyObject *readers = args[0], *bindings = args[1];
    if (readers_check(readers, "count_changes") < 0)
        return NULL;
    if (!readers_usable(readers))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(readers);
    Py_ssize_t count = PyDict_GET_SIZE(bindings);
    if (n == 0 || count == 0) { /* nothing to look up: the values alone */
        Py_ssize_t live = 0, position = 0;
        PyObject *key, *value;
        while (PyDict_Next(bindings, &position, &key, &value))
            live += value != Py_None;
        return PyLong_FromSsize_t(live);
    }
    Py_ssize_t key_size = ((RunReader *)PyTuple_GET_ITEM(readers, 0))->key_size;
    /* the keys copied (the dict is not read without the GIL), then whether each is bound */
    unsigned char *keys = buffer_allocate((size_t)(count * key_size) + 1);
    unsigned char *bound = buffer_allocate((size_t)count + 1);
    if (keys == NULL || bound == NULL) {
        buffer_release(keys);
        buffer_release(bound);
        return PyErr_NoMemory();
    }
    Py_ssize_t position = 0, i = 0, live = 0;
    PyObject *key, *value;
    while (PyDict_Next(bindings, &position, &key, &value)) {
        if (!PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) != key_size) {
            buffer_release(keys);
            buffer_release(bound);
            PyErr_SetString(PyExc_ValueError, "count_changes: a key of another size");
            return NULL;
        }
        memcpy(keys + i * key_size, PyBytes_AS_STRING(key), (size_t)key_size);
        bound[i++] = value != Py_None;
    }
    for (Py_ssize_t r = 0; r < n; r++)
        ((RunReader *)PyTuple_GET_ITEM(readers, r))->in_use++;
    run_fault fault = {NULL, 0};
    Py_ssize_t failed = -1;
    Py_BEGIN_ALLOW_THREADS
    gil_free_fault = &fault;
    for (Py_ssize_t k = 0; k < count && failed < 0; k++) {
        Py_ssize_t at = 0, row = 0;
        int state = first_state(readers, keys + k * key_size, key_size, &at, &row);
        if (state < 0)
            failed = at;
        live += bound[k] - (state == 1);
    }
    gil_free_fault = NULL;
    Py_END_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < n; r++) {
        RunReader *reader = (RunReader *)PyTuple_GET_ITEM(readers, r);
        if (--reader->in_use == 0 && reader->release_pending) {
            reader->release_pending = 0;
            release_buffer(reader);
        }
    }
    buffer_release(keys);
    buffer_release(bound);
    if (failed >= 0) {
        corrupt(fault.what, fault.offset);
        note_reader(failed);
        return NULL;
    }
    return PyLong_FromSsize_t(live);
}
