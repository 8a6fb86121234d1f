/* A run's blocked Bloom filter (see filter.py for the format). */

#ifndef L2_RUNS_FILTER_H
#define L2_RUNS_FILTER_H

#include <stdint.h>

#include "format.h"

/* The probes of one key hash, for any filter: y picks the block (given the
   number of blocks), z the bits in it. A lookup over many runs derives them
   once. */
typedef struct {
    uint64_t y; /* mix(key_hash) */
    uint64_t z; /* mix(y) */
} filter_probes;

/* The probes of key_hash (the key's zlib crc32, or any value below 2^64). */
RUNS_INTERNAL filter_probes filter_probes_of(uint64_t key_hash);

/* The block of the probes among `blocks` blocks (0 < blocks <= 2^32). */
RUNS_INTERNAL uint64_t filter_block(filter_probes probes, uint64_t blocks);

/* Whether every probed bit of `block` (FILTER_BLOCK_BYTES bytes) is set. */
RUNS_INTERNAL int filter_block_test(const unsigned char *block, filter_probes probes);

/* Set every probed bit of `block` (the writer's side of filter_block_test). */
RUNS_INTERNAL void filter_block_set(unsigned char *block, filter_probes probes);

/* Ask for the probed block of a filter of `blocks` blocks at `filter` to be
   brought into the cache (a hint: never faults, returns at once). */
RUNS_INTERNAL void filter_prefetch(const unsigned char *filter, uint64_t blocks,
                                   filter_probes probes);

#endif
