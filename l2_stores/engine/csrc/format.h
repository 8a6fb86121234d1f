/* The engine's format constants, as the C reads and writes them: framing.py
   and log.py's (the _accel extension exposes the log's as _accel.LOG_FORMAT,
   which log.py checks at import), run.py's and filter.py's (the _runs
   extension exposes them as _runs.FORMAT, which run.py and filter.py check
   at import): an extension built from other constants is refused, never
   used. */

#ifndef L2_RUNS_FORMAT_H
#define L2_RUNS_FORMAT_H

#include "internal.h"

/* framing.py */
#define CRC_RESIDUE 0x2144DF1CU /* crc32 of data followed by its crc32 (little-endian) */

/* log.py: a record's op byte (bit 7: the SYNCED flag) */
#define LOG_OP_SET 1
#define LOG_OP_REMOVE 2
#define LOG_OP_MARK 3
#define LOG_OP_SEAL 4
#define LOG_OP_BEGIN 5
#define LOG_OP_END 6
#define LOG_SYNCED 0x80
#define LOG_OP_MASK 0x7F

/* run.py */
#define RUN_MAGIC 0x00004E555253324CULL /* b"L2SRUN\0\0", little-endian */
#define RUN_HEADER_SIZE 64              /* the file header (framing) */
#define RUN_RUN_HEADER_SIZE 64          /* the run header after it */
#define RUN_FILTER_OFFSET 128           /* the filter follows both headers */
#define RUN_PAGE 4096                   /* the index region's checksummed pages */
#define RUN_CRC_SIZE 4
#define RUN_CRC_RESIDUE CRC_RESIDUE      /* a row: its data and its crc32 */
#define RUN_REMOVAL_MASK 0xFFFFFFFFU    /* a removal row's crc32 is inverted */
#define RUN_REMOVAL_RESIDUE 0xFFFFFFFFU /* zlib crc32 of data and its inverted crc32 */
#define RUN_RADIX_ENTRY 4
#define RUN_MAX_RADIX_BITS 22
#define RUN_MAX_PREFIX 255
#define RUN_DENSE_SAMPLES 16            /* fences past the first a reader samples (no format's) */

/* filter.py */
#define FILTER_BLOCK_BYTES 64
#define FILTER_PROBES 7
#define FILTER_PROBE_BITS 9
#define FILTER_MIX_SHIFT 33
#define FILTER_MIX_MULTIPLIER_1 0xFF51AFD7ED558CCDULL
#define FILTER_MIX_MULTIPLIER_2 0xC4CEB9FE1A85EC53ULL

/* X(name in FORMAT, value): every constant above, for _runs.FORMAT. */
#define RUN_FORMAT_CONSTANTS(X)                        \
    X("MAGIC", RUN_MAGIC)                              \
    X("HEADER_SIZE", RUN_HEADER_SIZE)                  \
    X("RUN_HEADER_SIZE", RUN_RUN_HEADER_SIZE)          \
    X("FILTER_OFFSET", RUN_FILTER_OFFSET)              \
    X("PAGE", RUN_PAGE)                                \
    X("CRC_SIZE", RUN_CRC_SIZE)                        \
    X("CRC_RESIDUE", RUN_CRC_RESIDUE)                  \
    X("REMOVAL_MASK", RUN_REMOVAL_MASK)                \
    X("REMOVAL_RESIDUE", RUN_REMOVAL_RESIDUE)          \
    X("RADIX_ENTRY", RUN_RADIX_ENTRY)                  \
    X("MAX_RADIX_BITS", RUN_MAX_RADIX_BITS)            \
    X("MAX_PREFIX", RUN_MAX_PREFIX)                    \
    X("DENSE_SAMPLES", RUN_DENSE_SAMPLES)              \
    X("BLOCK_BYTES", FILTER_BLOCK_BYTES)               \
    X("PROBES", FILTER_PROBES)                         \
    X("PROBE_BITS", FILTER_PROBE_BITS)                 \
    X("MIX_SHIFT", FILTER_MIX_SHIFT)                   \
    X("MIX_MULTIPLIER_1", FILTER_MIX_MULTIPLIER_1)     \
    X("MIX_MULTIPLIER_2", FILTER_MIX_MULTIPLIER_2)

#if FILTER_PROBES * FILTER_PROBE_BITS > 64 || (1 << FILTER_PROBE_BITS) != FILTER_BLOCK_BYTES * 8
#error "a block's probes must fit one 64-bit mix and address every bit of a block"
#endif

#define RUNS_INTERNAL L2_INTERNAL

#endif
