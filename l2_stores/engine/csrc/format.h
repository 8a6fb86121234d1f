/* The run format's constants, as the C run reader reads them (see run.py and
   filter.py for the layout). The module exposes them as _runs.FORMAT, and
   run.py and filter.py check at import that they equal their own: a reader
   built from other constants is refused, never used. */

#ifndef L2_RUNS_FORMAT_H
#define L2_RUNS_FORMAT_H

/* run.py */
#define RUN_MAGIC 0x00004E555253324CULL /* b"L2SRUN\0\0", little-endian */
#define RUN_HEADER_SIZE 64              /* the file header (framing) */
#define RUN_RUN_HEADER_SIZE 64          /* the run header after it */
#define RUN_FILTER_OFFSET 128           /* the filter follows both headers */
#define RUN_PAGE 4096                   /* the index region's checksummed pages */
#define RUN_CRC_SIZE 4
#define RUN_CRC_RESIDUE 0x2144DF1CU     /* zlib crc32 of data and its crc32 */
#define RUN_REMOVAL_MASK 0xFFFFFFFFU    /* a removal row's crc32 is inverted */
#define RUN_REMOVAL_RESIDUE 0xFFFFFFFFU /* zlib crc32 of data and its inverted crc32 */
#define RUN_RADIX_ENTRY 4
#define RUN_MAX_RADIX_BITS 22
#define RUN_MAX_PREFIX 255

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
    X("BLOCK_BYTES", FILTER_BLOCK_BYTES)               \
    X("PROBES", FILTER_PROBES)                         \
    X("PROBE_BITS", FILTER_PROBE_BITS)                 \
    X("MIX_SHIFT", FILTER_MIX_SHIFT)                   \
    X("MIX_MULTIPLIER_1", FILTER_MIX_MULTIPLIER_1)     \
    X("MIX_MULTIPLIER_2", FILTER_MIX_MULTIPLIER_2)

#if FILTER_PROBES * FILTER_PROBE_BITS > 64 || (1 << FILTER_PROBE_BITS) != FILTER_BLOCK_BYTES * 8
#error "a block's probes must fit one 64-bit mix and address every bit of a block"
#endif

/* Symbols shared between the extension's files, not exported from it. */
#if defined(__GNUC__)
#define RUNS_INTERNAL __attribute__((visibility("hidden")))
#else
#define RUNS_INTERNAL
#endif

#endif
