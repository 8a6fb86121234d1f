/* RunBuilder: the byte work of run.py's RunWriter, in C.

   RunWriter keeps the policy (the file, its name, the headers, fsync,
   abort); a builder it makes when accel.py provides one writes, through the
   file descriptor it is given and nothing else, exactly the bytes its
   Python path writes:

     rows         key | value | crc32(key | value), or for a removal
                  key | zeros | crc32(key | zeros) ^ REMOVAL_MASK, by pwrite
                  from the rows offset on, in chunks of WRITE_CHUNK bytes
     filter       the bits of crc32(key) of every row (filter.c's probes)
     fences       the key of rows 0, P, 2P, ...
     radix        from the fences, as RunWriter.finish computes it
     page crcs    crc32 of each 4 KiB page of filter .. rows

   The filter, fences and radix (about 10 bits and a key's bytes every P
   rows of capacity) are built in memory and written at finish; RunWriter
   then writes the two headers from what finish returns (count, removals,
   prefix, shift, base). Small ones are calloc'd; from MAP_INDEX_FROM bytes
   on (a merge into a run of a million rows and more: 225 MB at 100M rows,
   which must not be private memory) they are the file's own bytes,
   allocated on disk first and written through a shared mapping, where
   mapping.c says that is safe (the blocks allocated, a full disk cannot
   raise SIGBUS); elsewhere, or when the allocation fails, calloc'd too.
   Rows are always written, so a full disk there is an OSError.

   Rows come from Python (add: a list of (key, value | removed), GIL held
   but for the writes of full chunks, checked as RunWriter.add checks them) or from a merge of runs' readers
   (merge: newest reader first, each input row's checksum checked as it is
   reached, the GIL released throughout; the readers' buffers are exported
   again for the merge's length, so the runs' maps cannot close under it).
   A merge is cancelled by a nonzero first byte of the bytearray it is
   given, polled every CANCEL_CHECK rows. */

#define PY_SSIZE_T_CLEAN
#ifdef __linux__
#define _GNU_SOURCE /* sync_file_range */
#endif
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "crc32.h"
#include "filter.h"
#include "mapping.h"
#include "format.h"
#include "run_lookup.h"
#include "run_writer.h"

#define WRITE_CHUNK (1 << 20) /* run.py's WRITE_CHUNK: rows written in chunks this big */
#define MAP_INDEX_FROM (1 << 20) /* index sections this big are written through a map
                                    (by default: RunBuilder's map_index_from) */
#define CANCEL_CHECK 256      /* rows between two looks at the cancel flag */

static const char ROW_MISMATCH[] = "run row checksum mismatch";

typedef struct {
    PyObject_HEAD
    int fd;
    PyObject *removed; /* what a removal row is given as */
    Py_ssize_t key_size, value_size, row_size, capacity;
    Py_ssize_t fence_rows, radix_bits;
    uint64_t filter_blocks;
    Py_ssize_t fence_at, radix_at, rows_at; /* offsets in the file */
    unsigned char *index;                   /* the file's bytes FILTER_OFFSET .. rows_at */
    Py_ssize_t index_size;
    unsigned char *map; /* the file's bytes 0 .. rows_at, mapped, when index lies there */
    unsigned char *pending; /* rows not written yet */
    Py_ssize_t pending_length, pending_capacity;
    Py_ssize_t written; /* the file offset of pending's first byte */
    Py_ssize_t count, removals;
    unsigned char *first, *last; /* the first and last keys added */
    int busy;                    /* a call runs without the GIL: others are refused */
    int finished;
} RunBuilder;

/* ------------------------------------------------------------------ bytes */

/* Python's int.bit_length of a u64. */
static inline int
bit_length(uint64_t value)
{
    int bits = 0;
    while (value) {
        bits++;
        value >>= 1;
    }
    return bits;
}

/* Write all of data at offset: 0, or an errno. Runs without the GIL. */
static int
pwrite_all(int fd, const unsigned char *data, Py_ssize_t length, Py_ssize_t offset)
{
    while (length > 0) {
        ssize_t done = pwrite(fd, data, (size_t)length, (off_t)offset);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (done == 0)
            return EIO;
        data += done;
        length -= done;
        offset += done;
    }
    return 0;
}

/* ------------------------------------------------------------- the rows */

/* Write the pending rows: 0, or an errno. Runs without the GIL. */
static int
write_pending(RunBuilder *self)
{
    if (!self->pending_length)
        return 0;
    int error = pwrite_all(self->fd, self->pending, self->pending_length, self->written);
    if (error)
        return error;
#ifdef SYNC_FILE_RANGE_WRITE
    /* Start the writeback of these rows now: the run is fsynced when it is
       done, and a flush's directory fsync may wait behind the dirty pages
       of a large merge (ext4 orders the data before the journal); started
       chunk by chunk, neither waits long. A hint: a failure is ignored. */
    (void)sync_file_range(self->fd, (off_t)self->written, (off_t)self->pending_length,
                          SYNC_FILE_RANGE_WRITE);
#endif
    self->written += self->pending_length;
    self->pending_length = 0;
    return 0;
}

/* RunWriter.add's bytes for a key greater than the last, capacity left:
   value NULL for a removal, crc_of_value the 4 bytes of crc32(key | value)
   when the caller has them checked (or NULL), into the pending rows (the caller writes them
   once they reach WRITE_CHUNK bytes). Runs without the GIL. */
static void
append_row(RunBuilder *self, const unsigned char *key, const unsigned char *value,
           const unsigned char *crc_of_value)
{
    Py_ssize_t key_size = self->key_size, value_size = self->value_size;
    if (self->count % self->fence_rows == 0)
        memcpy(self->index + (self->fence_at - RUN_FILTER_OFFSET) +
                   (self->count / self->fence_rows) * key_size,
               key, (size_t)key_size);
    if (self->count == 0)
        memcpy(self->first, key, (size_t)key_size);
    memcpy(self->last, key, (size_t)key_size);
    filter_probes probes = filter_probes_of(crc32_of(key, key_size));
    filter_block_set(self->index + filter_block(probes, self->filter_blocks) * FILTER_BLOCK_BYTES,
                     probes);
    unsigned char *row = self->pending + self->pending_length;
    memcpy(row, key, (size_t)key_size);
    if (value != NULL)
        memcpy(row + key_size, value, (size_t)value_size);
    else
        memset(row + key_size, 0, (size_t)value_size);
    if (value != NULL && crc_of_value != NULL) {
        /* a checked row's own crc32(key | value): the same bytes */
        memcpy(row + key_size + value_size, crc_of_value, RUN_CRC_SIZE);
    } else {
        uint32_t crc = crc32_of(row, key_size + value_size);
        if (value == NULL) {
            crc ^= RUN_REMOVAL_MASK;
            self->removals++;
        }
        write_u32(row + key_size + value_size, crc);
    }
    self->pending_length += self->row_size;
    self->count++;
}

static int
ready(RunBuilder *self)
{
    if (self->index == NULL) {
        PyErr_SetString(PyExc_ValueError, "RunBuilder is not initialized or closed");
        return 0;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "RunBuilder is in use by another thread");
        return 0;
    }
    if (self->finished) {
        PyErr_SetString(PyExc_ValueError, "RunBuilder is finished");
        return 0;
    }
    return 1;
}

/* The ValueError of RunWriter.add for keys out of order. */
static void
out_of_order(const unsigned char *key, const unsigned char *last, Py_ssize_t key_size)
{
    PyObject *now = PyBytes_FromStringAndSize((const char *)key, key_size);
    PyObject *before = PyBytes_FromStringAndSize((const char *)last, key_size);
    PyObject *now_hex = now ? PyObject_CallMethod(now, "hex", NULL) : NULL;
    PyObject *before_hex = before ? PyObject_CallMethod(before, "hex", NULL) : NULL;
    if (now_hex != NULL && before_hex != NULL)
        PyErr_Format(PyExc_ValueError, "run keys out of order: %U after %U", now_hex, before_hex);
    Py_XDECREF(now);
    Py_XDECREF(before);
    Py_XDECREF(now_hex);
    Py_XDECREF(before_hex);
}

static PyObject *
builder_add(RunBuilder *self, PyObject *rows)
{
    if (!ready(self))
        return NULL;
    if (!PyList_Check(rows)) {
        PyErr_SetString(PyExc_TypeError, "add(rows, /): rows is a list of (key, value) pairs");
        return NULL;
    }
    Py_ssize_t key_size = self->key_size, value_size = self->value_size;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(rows); i++) {
        PyObject *pair = PyList_GET_ITEM(rows, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "add(rows, /): rows is a list of (key, value) pairs");
            return NULL;
        }
        PyObject *key_object = PyTuple_GET_ITEM(pair, 0);
        PyObject *value_object = PyTuple_GET_ITEM(pair, 1);
        if (!PyBytes_Check(key_object)) {
            PyErr_Format(PyExc_TypeError, "a run's key is bytes, not %.100s",
                         Py_TYPE(key_object)->tp_name);
            return NULL;
        }
        const unsigned char *key = (const unsigned char *)PyBytes_AS_STRING(key_object);
        if (PyBytes_GET_SIZE(key_object) != key_size) {
            PyErr_Format(PyExc_ValueError, "key of %zd bytes in a run of %zd-byte keys",
                         PyBytes_GET_SIZE(key_object), key_size);
            return NULL;
        }
        if (self->count && memcmp(key, self->last, (size_t)key_size) <= 0) {
            out_of_order(key, self->last, key_size);
            return NULL;
        }
        if (self->count >= self->capacity) {
            PyErr_Format(PyExc_ValueError, "run of capacity %zd is full", self->capacity);
            return NULL;
        }
        const unsigned char *value = NULL;
        if (value_object != self->removed) {
            if (!PyBytes_Check(value_object)) {
                PyErr_Format(PyExc_TypeError, "a run's value is bytes or removed, not %.100s",
                             Py_TYPE(value_object)->tp_name);
                return NULL;
            }
            if (PyBytes_GET_SIZE(value_object) != value_size) {
                PyErr_Format(PyExc_ValueError, "value of %zd bytes in a run of %zd-byte values",
                             PyBytes_GET_SIZE(value_object), value_size);
                return NULL;
            }
            value = (const unsigned char *)PyBytes_AS_STRING(value_object);
        }
        if (self->pending_length + self->row_size > self->pending_capacity) {
            PyErr_SetString(PyExc_SystemError, "RunBuilder: pending rows overflow");
            return NULL;
        }
        append_row(self, key, value, NULL);
        if (self->pending_length >= WRITE_CHUNK) {
            /* (the GIL released: a write may wait for the kernel's writeback) */
            int error;
            self->busy = 1;
            Py_BEGIN_ALLOW_THREADS
            error = write_pending(self);
            Py_END_ALLOW_THREADS
            self->busy = 0;
            if (error) {
                errno = error;
                return PyErr_SetFromErrno(PyExc_OSError);
            }
        }
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------ a dict */

typedef struct {
    const unsigned char *key;
    const unsigned char *value; /* NULL: a removal */
} binding;

/* qsort's comparator reads the key size from here (one sort per thread at a time). */
static _Thread_local size_t sorted_key_size;

static int
compare_bindings(const void *a, const void *b)
{
    return memcmp(((const binding *)a)->key, ((const binding *)b)->key, sorted_key_size);
}

/* Sort the bindings and append their rows; 0, or an errno. Runs without the GIL. */
static int
append_sorted(RunBuilder *self, binding *bindings, Py_ssize_t n, int drop_removals)
{
    sorted_key_size = (size_t)self->key_size;
    qsort(bindings, (size_t)n, sizeof(binding), compare_bindings);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (drop_removals && bindings[i].value == NULL)
            continue;
        append_row(self, bindings[i].key, bindings[i].value, NULL);
        if (self->pending_length >= WRITE_CHUNK) {
            int error = write_pending(self);
            if (error)
                return error;
        }
    }
    return 0;
}

static PyObject *
builder_add_bindings(RunBuilder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "add_bindings(bindings, drop_removals, /): a dict");
        return NULL;
    }
    if (!ready(self))
        return NULL;
    int drop_removals = PyObject_IsTrue(args[1]);
    if (drop_removals < 0)
        return NULL;
    PyObject *mapping = args[0];
    Py_ssize_t n = PyDict_GET_SIZE(mapping);
    if (self->count > 0 || n > self->capacity) {
        PyErr_Format(PyExc_ValueError,
                     "add_bindings: %zd bindings into a run of %zd rows and capacity %zd", n,
                     self->count, self->capacity);
        return NULL;
    }
    binding *bindings = buffer_allocate(((size_t)n + 1) * sizeof(binding));
    /* the keys and values, referenced until the rows are written */
    PyObject **held = buffer_allocate(((size_t)n * 2 + 1) * sizeof(PyObject *));
    Py_ssize_t holding = 0, position = 0, i = 0;
    PyObject *key_object, *value_object, *result = NULL;
    if (bindings == NULL || held == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    while (PyDict_Next(mapping, &position, &key_object, &value_object)) {
        if (i >= n) {
            PyErr_SetString(PyExc_RuntimeError, "add_bindings: the dict changed size");
            goto done;
        }
        if (!PyBytes_Check(key_object) || PyBytes_GET_SIZE(key_object) != self->key_size) {
            PyErr_Format(PyExc_ValueError, "add_bindings: a key is not %zd bytes", self->key_size);
            goto done;
        }
        if (value_object != Py_None &&
            (!PyBytes_Check(value_object) || PyBytes_GET_SIZE(value_object) != self->value_size)) {
            PyErr_Format(PyExc_ValueError, "add_bindings: a value is neither None nor %zd bytes",
                         self->value_size);
            goto done;
        }
        held[holding++] = Py_NewRef(key_object);
        held[holding++] = Py_NewRef(value_object);
        bindings[i].key = (const unsigned char *)PyBytes_AS_STRING(key_object);
        bindings[i].value =
            value_object == Py_None ? NULL : (const unsigned char *)PyBytes_AS_STRING(value_object);
        i++;
    }
    int error;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    error = append_sorted(self, bindings, i, drop_removals);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (error) {
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    else
        result = Py_NewRef(Py_None);
done:
    if (held != NULL)
        for (Py_ssize_t j = 0; j < holding; j++)
            Py_DECREF(held[j]);
    buffer_release(held);
    buffer_release(bindings);
    return result;
}

/* ------------------------------------------------------------ the merge */

typedef struct {
    const unsigned char *rows; /* the reader's first row */
    Py_ssize_t count, index;   /* rows, and the next one */
    Py_ssize_t rows_at;        /* the rows' file offset (for errors) */
    int state;                 /* the next row's: 1 a value, 2 a removal */
} cursor;

enum merge_outcome { MERGED, CANCELLED, CORRUPT, DISORDER, WRITE_FAILED };

/* Check the next row of a cursor: 1, or 0 when its checksum fails. */
static inline int
check_head(cursor *c, Py_ssize_t row_size)
{
    if (c->index >= c->count)
        return 1;
    uint32_t residue = crc32_of(c->rows + c->index * row_size, row_size);
    c->state = residue == RUN_CRC_RESIDUE ? 1 : residue == RUN_REMOVAL_RESIDUE ? 2 : 0;
    return c->state != 0;
}

/* The k-way merge, newest cursor first; runs without the GIL. *failed: the
   cursor whose row failed (CORRUPT), or the errno (WRITE_FAILED). */
static enum merge_outcome
merge_cursors(RunBuilder *self, cursor *cursors, Py_ssize_t k, int drop_removals,
              const volatile unsigned char *cancel, Py_ssize_t *failed)
{
    Py_ssize_t row_size = self->row_size, key_size = self->key_size;
    for (Py_ssize_t i = 0; i < k; i++)
        if (!check_head(&cursors[i], row_size)) {
            *failed = i;
            return CORRUPT;
        }
    for (uint64_t step = 0;; step++) {
        if (cancel != NULL && step % CANCEL_CHECK == 0 && cancel[0])
            return CANCELLED;
        Py_ssize_t best = -1;
        const unsigned char *key = NULL;
        for (Py_ssize_t i = 0; i < k; i++) {
            cursor *c = &cursors[i];
            if (c->index >= c->count)
                continue;
            const unsigned char *head = c->rows + c->index * row_size;
            if (best < 0 || memcmp(head, key, (size_t)key_size) < 0) {
                best = i;
                key = head;
            }
        }
        if (best < 0)
            return MERGED;
        int state = cursors[best].state;
        if (!(drop_removals && state == 2)) {
            if (self->count && memcmp(key, self->last, (size_t)key_size) <= 0)
                return DISORDER;
            if (self->count >= self->capacity)
                return DISORDER;
            /* a value row is copied whole (its checksum held); a removal is
               written as RunWriter writes one: zeros, its crc computed */
            append_row(self, key, state == 2 ? NULL : key + key_size,
                       state == 2 ? NULL : key + key_size + self->value_size);
            if (self->pending_length >= WRITE_CHUNK) {
                int error = write_pending(self);
                if (error) {
                    *failed = error;
                    return WRITE_FAILED;
                }
            }
        }
        /* every older row of the same key is shadowed: skip it */
        for (Py_ssize_t i = 0; i < k; i++) {
            cursor *c = &cursors[i];
            if (i == best || c->index >= c->count ||
                memcmp(c->rows + c->index * row_size, key, (size_t)key_size) != 0)
                continue;
            c->index++;
            if (!check_head(c, row_size)) {
                *failed = i;
                return CORRUPT;
            }
        }
        cursors[best].index++;
        if (!check_head(&cursors[best], row_size)) {
            *failed = best;
            return CORRUPT;
        }
    }
}

static void
raise_corrupt(Py_ssize_t reader, Py_ssize_t offset)
{
    PyObject *error = PyObject_CallFunction(RunCorrupt, "sn", ROW_MISMATCH, offset);
    if (error == NULL)
        return;
    PyObject *at = PyLong_FromSsize_t(reader);
    if (at == NULL || PyObject_SetAttrString(error, "index", at) < 0)
        PyErr_Clear();
    Py_XDECREF(at);
    PyErr_SetObject(RunCorrupt, error);
    Py_DECREF(error);
}

static PyObject *
builder_merge(RunBuilder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "merge(readers, drop_removals, cancel, /)");
        return NULL;
    }
    if (!ready(self))
        return NULL;
    PyObject *readers = args[0];
    if (!PyTuple_Check(readers)) {
        PyErr_SetString(PyExc_TypeError, "merge: readers must be a tuple of RunReader");
        return NULL;
    }
    int drop_removals = PyObject_IsTrue(args[1]);
    if (drop_removals < 0)
        return NULL;
    PyObject *cancel_object = args[2];
    Py_buffer cancel_view;
    int has_cancel = cancel_object != Py_None;
    if (has_cancel) {
        if (!PyByteArray_Check(cancel_object)) {
            PyErr_SetString(PyExc_TypeError, "merge: cancel is a bytearray or None");
            return NULL;
        }
        if (PyObject_GetBuffer(cancel_object, &cancel_view, PyBUF_SIMPLE) < 0)
            return NULL;
        if (cancel_view.len < 1) {
            PyBuffer_Release(&cancel_view);
            PyErr_SetString(PyExc_ValueError, "merge: cancel is a bytearray of one byte or more");
            return NULL;
        }
    }
    Py_ssize_t k = PyTuple_GET_SIZE(readers);
    cursor *cursors = PyMem_Calloc((size_t)k + 1, sizeof(cursor));
    Py_buffer *views = PyMem_Calloc((size_t)k + 1, sizeof(Py_buffer));
    Py_ssize_t held = 0;
    PyObject *result = NULL;
    if (cursors == NULL || views == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *item = PyTuple_GET_ITEM(readers, i);
        if (!PyObject_TypeCheck(item, &RunReaderType)) {
            PyErr_SetString(PyExc_TypeError, "merge: readers must be a tuple of RunReader");
            goto done;
        }
        RunReader *reader = (RunReader *)item;
        if (!reader->held) {
            PyErr_SetString(PyExc_ValueError, "RunReader is released");
            goto done;
        }
        if (reader->key_size != self->key_size || reader->value_size != self->value_size) {
            PyErr_SetString(PyExc_ValueError, "merge: a reader of other key or value sizes");
            goto done;
        }
        /* an export of our own: the map stays open until the merge is done */
        if (PyObject_GetBuffer(reader->buffer.obj, &views[i], PyBUF_SIMPLE) < 0)
            goto done;
        held++;
        if (views[i].buf != reader->buffer.buf || views[i].len != reader->buffer.len) {
            PyErr_SetString(PyExc_ValueError, "merge: a reader's buffer moved");
            goto done;
        }
        cursors[i].rows = (const unsigned char *)views[i].buf + reader->rows_at;
        cursors[i].count = reader->count;
        cursors[i].rows_at = reader->rows_at;
        total += reader->count;
    }
    (void)total;
    Py_ssize_t failed = 0;
    enum merge_outcome outcome;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    outcome = merge_cursors(self, cursors, k, drop_removals,
                            has_cancel ? (const volatile unsigned char *)cancel_view.buf : NULL,
                            &failed);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    switch (outcome) {
    case MERGED:
        result = Py_NewRef(Py_True);
        break;
    case CANCELLED:
        result = Py_NewRef(Py_False);
        break;
    case CORRUPT:
        raise_corrupt(failed, cursors[failed].rows_at +
                                  cursors[failed].index * self->row_size);
        break;
    case DISORDER:
        PyErr_SetString(PyExc_ValueError,
                        "merge: the readers' rows are out of order or over the capacity");
        break;
    case WRITE_FAILED:
        errno = (int)failed;
        PyErr_SetFromErrno(PyExc_OSError);
        break;
    }
done:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(cursors);
    if (has_cancel)
        PyBuffer_Release(&cancel_view);
    return result;
}

/* ------------------------------------------------------------ finish */

typedef struct {
    Py_ssize_t prefix;
    Py_ssize_t shift;
    uint64_t base;
} radix_fields;

/* RunWriter.finish's byte work: the last rows, the radix, the index
   sections, the page checksums. 0, or an errno. Runs without the GIL. */
static int
finish_bytes(RunBuilder *self, radix_fields *fields)
{
    int error = write_pending(self);
    if (error)
        return error;
    Py_ssize_t key_size = self->key_size;
    Py_ssize_t fences = (self->count + self->fence_rows - 1) / self->fence_rows;
    fields->prefix = fields->shift = 0;
    fields->base = 0;
    if (self->count) {
        Py_ssize_t prefix = 0;
        Py_ssize_t limit = key_size < RUN_MAX_PREFIX ? key_size : RUN_MAX_PREFIX;
        while (prefix < limit && self->first[prefix] == self->last[prefix])
            prefix++;
        uint64_t base = normalized(self->first, key_size, prefix);
        uint64_t span = normalized(self->last, key_size, prefix) - base;
        int shift = bit_length(span) - (int)self->radix_bits;
        if (shift < 0)
            shift = 0;
        Py_ssize_t buckets = (Py_ssize_t)1 << self->radix_bits;
        unsigned char *radix = self->index + (self->radix_at - RUN_FILTER_OFFSET);
        const unsigned char *fence_keys = self->index + (self->fence_at - RUN_FILTER_OFFSET);
        Py_ssize_t bucket = 0;
        for (Py_ssize_t fence = 0; fence < fences; fence++) {
            uint64_t value = normalized(fence_keys + fence * key_size, key_size, prefix) - base;
            uint64_t fence_bucket = shift >= 64 ? 0 : value >> shift;
            while (bucket <= buckets && (uint64_t)bucket <= fence_bucket) {
                write_u32(radix + bucket * RUN_RADIX_ENTRY, (uint32_t)fence);
                bucket++;
            }
        }
        for (; bucket <= buckets; bucket++)
            write_u32(radix + bucket * RUN_RADIX_ENTRY, (uint32_t)fences);
        fields->prefix = prefix;
        fields->shift = shift;
        fields->base = base;
    }
    if (self->map == NULL) { /* (mapped: the bytes are the file's already) */
        error = pwrite_all(self->fd, self->index, self->index_size, RUN_FILTER_OFFSET);
        if (error)
            return error;
    }
    Py_ssize_t pages = (self->index_size + RUN_PAGE - 1) / RUN_PAGE;
    unsigned char *crcs = buffer_allocate((size_t)pages * RUN_CRC_SIZE + 1);
    if (crcs == NULL)
        return ENOMEM;
    for (Py_ssize_t page = 0; page < pages; page++) {
        Py_ssize_t low = page * RUN_PAGE;
        Py_ssize_t high = low + RUN_PAGE < self->index_size ? low + RUN_PAGE : self->index_size;
        write_u32(crcs + page * RUN_CRC_SIZE, crc32_of(self->index + low, high - low));
    }
    error = pwrite_all(self->fd, crcs, pages * RUN_CRC_SIZE,
                       self->rows_at + self->count * self->row_size);
    buffer_release(crcs);
    return error;
}

static PyObject *
builder_finish(RunBuilder *self, PyObject *Py_UNUSED(ignored))
{
    if (!ready(self))
        return NULL;
    radix_fields fields;
    int error;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    error = finish_bytes(self, &fields);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (error) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->finished = 1;
    return Py_BuildValue("(nnnnK)", self->count, self->removals, fields.prefix, fields.shift,
                         (unsigned long long)fields.base);
}

/* ------------------------------------------------------------ the type */

static void
builder_free_state(RunBuilder *self)
{
    if (self->map != NULL)
        mapping_release(self->map, (size_t)self->rows_at);
    else
        buffer_release(self->index);
    self->map = NULL;
    buffer_release(self->pending);
    PyMem_RawFree(self->first);
    PyMem_RawFree(self->last);
    self->index = self->pending = self->first = self->last = NULL;
    Py_CLEAR(self->removed);
}

static PyObject *
builder_close(RunBuilder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "RunBuilder is in use by another thread");
        return NULL;
    }
    builder_free_state(self);
    Py_RETURN_NONE;
}

static int
builder_traverse(RunBuilder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->removed);
    return 0;
}

static int
builder_clear(RunBuilder *self)
{
    Py_CLEAR(self->removed);
    return 0;
}

static void
builder_dealloc(RunBuilder *self)
{
    PyObject_GC_UnTrack(self);
    builder_free_state(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
builder_init(RunBuilder *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"fd",         "removed",      "key_size",   "value_size",
                               "capacity",   "filter_blocks", "fence_rows", "radix_bits",
                               "fence_offset", "radix_offset", "rows_offset", "map_index_from",
                               NULL};
    int fd;
    PyObject *removed;
    Py_ssize_t key_size, value_size, capacity, blocks, fence_rows, radix_bits;
    Py_ssize_t fence_at, radix_at, rows_at, map_from = MAP_INDEX_FROM;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOnnnnnnnnn|n:RunBuilder", keywords, &fd,
                                     &removed, &key_size, &value_size, &capacity, &blocks,
                                     &fence_rows, &radix_bits, &fence_at, &radix_at, &rows_at,
                                     &map_from))
        return -1;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "RunBuilder is in use by another thread");
        return -1;
    }
    builder_free_state(self);
    if (fd < 0 || key_size < 1 || value_size < 0 || capacity < 0 || blocks < 1 ||
        (uint64_t)blocks > ((uint64_t)1 << 32) || fence_rows < 1 || radix_bits < 0 ||
        radix_bits > RUN_MAX_RADIX_BITS || key_size > (1 << 24) || value_size > (1 << 24) ||
        capacity > PY_SSIZE_T_MAX / 64) {
        PyErr_SetString(PyExc_ValueError, "RunBuilder: parameters out of range");
        return -1;
    }
    Py_ssize_t fence_capacity = (capacity + fence_rows - 1) / fence_rows;
    if (fence_at != RUN_FILTER_OFFSET + blocks * FILTER_BLOCK_BYTES ||
        radix_at != fence_at + fence_capacity * key_size ||
        rows_at != radix_at + (((Py_ssize_t)1 << radix_bits) + 1) * RUN_RADIX_ENTRY) {
        PyErr_SetString(PyExc_ValueError, "RunBuilder: sections disagree with their sizes");
        return -1;
    }
    self->fd = fd;
    self->key_size = key_size;
    self->value_size = value_size;
    self->row_size = key_size + value_size + RUN_CRC_SIZE;
    self->capacity = capacity;
    self->fence_rows = fence_rows;
    self->radix_bits = radix_bits;
    self->filter_blocks = (uint64_t)blocks;
    self->fence_at = fence_at;
    self->radix_at = radix_at;
    self->rows_at = rows_at;
    self->index_size = rows_at - RUN_FILTER_OFFSET;
    self->pending_capacity = WRITE_CHUNK + self->row_size;
    self->pending_length = 0;
    self->written = rows_at;
    self->count = self->removals = 0;
    self->finished = 0;
    if (self->index_size >= map_from) {
        unsigned char *map;
        self->busy = 1; /* (the GIL released: no other call may touch this builder) */
        Py_BEGIN_ALLOW_THREADS
        map = mapping_allocate(fd, RUN_FILTER_OFFSET, (size_t)self->index_size);
        Py_END_ALLOW_THREADS
        self->busy = 0;
        if (map != NULL) {
            self->map = map;
            self->index = map + RUN_FILTER_OFFSET;
        }
    }
    if (self->index == NULL)
        self->index = buffer_allocate((size_t)self->index_size);
    self->pending = buffer_allocate((size_t)self->pending_capacity);
    self->first = PyMem_RawMalloc((size_t)key_size);
    self->last = PyMem_RawMalloc((size_t)key_size);
    if (self->index == NULL || self->pending == NULL || self->first == NULL ||
        self->last == NULL) {
        builder_free_state(self);
        PyErr_NoMemory();
        return -1;
    }
    self->removed = Py_NewRef(removed);
    return 0;
}

static PyObject *
builder_count(RunBuilder *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->count);
}

static PyObject *
builder_mapped(RunBuilder *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->map != NULL);
}

static PyGetSetDef builder_getset[] = {
    {"count", (getter)builder_count, NULL, "Rows added so far.", NULL},
    {"mapped", (getter)builder_mapped, NULL,
     "Whether the index sections are written through a map of the file.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef builder_methods[] = {
    {"add", (PyCFunction)builder_add, METH_O,
     "add(rows, /): append rows, a list of (key, value | removed) in ascending key order\n"
     "(ValueError as RunWriter.add's, TypeError, OSError from writing)."},
    {"add_bindings", (PyCFunction)(void (*)(void))builder_add_bindings, METH_FASTCALL,
     "add_bindings(bindings, drop_removals, /): the rows of a dict of key to value (None: a\n"
     "removal, left out with drop_removals), sorted by key, into an empty run; without the GIL."},
    {"merge", (PyCFunction)(void (*)(void))builder_merge, METH_FASTCALL,
     "merge(readers, drop_removals, cancel, /) -> bool: append the rows of the readers (a\n"
     "tuple of RunReader, newest first), each key once from the newest reader holding it,\n"
     "removals left out if drop_removals; without the GIL. False when cancel (a bytearray,\n"
     "or None) had a nonzero first byte: the rows are then partly added. RunCorrupt(what,\n"
     "offset) with an index attribute (the reader's place) when an input row fails."},
    {"finish", (PyCFunction)builder_finish, METH_NOARGS,
     "finish() -> (count, removals, prefix, shift, base): write the last rows, the filter,\n"
     "fences and radix, and the page checksums (not the headers, nor fsync)."},
    {"close", (PyCFunction)builder_close, METH_NOARGS,
     "Free the builder's memory (the fd is the caller's); calls then raise ValueError."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject RunBuilderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores.engine._runs.RunBuilder",
    .tp_basicsize = sizeof(RunBuilder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "RunBuilder(fd, removed, key_size, value_size, capacity, filter_blocks, "
              "fence_rows, radix_bits, fence_offset, radix_offset, rows_offset, "
              "map_index_from=1 MiB)\n\n"
              "The byte work of run.RunWriter: rows, filter, fences, radix and page checksums\n"
              "written through fd (run.Geometry gives the sizes and offsets).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)builder_init,
    .tp_dealloc = (destructor)builder_dealloc,
    .tp_traverse = (traverseproc)builder_traverse,
    .tp_clear = (inquiry)builder_clear,
    .tp_methods = builder_methods,
    .tp_getset = builder_getset,
};
