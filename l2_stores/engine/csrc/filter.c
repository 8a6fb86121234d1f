/* A run's blocked Bloom filter: the probe derivation, the block test and
   the block's bits set, bit for bit as filter.py (the format is theirs). */

#include "filter.h"

/* MurmurHash3's 64-bit finalizer (filter.py's _mix). */
static inline uint64_t
mix(uint64_t value)
{
    value ^= value >> FILTER_MIX_SHIFT;
    value *= FILTER_MIX_MULTIPLIER_1;
    value ^= value >> FILTER_MIX_SHIFT;
    value *= FILTER_MIX_MULTIPLIER_2;
    return value ^ (value >> FILTER_MIX_SHIFT);
}

filter_probes
filter_probes_of(uint64_t key_hash)
{
    filter_probes probes;
    probes.y = mix(key_hash);
    probes.z = mix(probes.y);
    return probes;
}

uint64_t
filter_block(filter_probes probes, uint64_t blocks)
{
    /* ((y >> 32) * m) >> 32: below m, and no overflow while m <= 2^32 */
    return ((probes.y >> 32) * blocks) >> 32;
}

int
filter_block_test(const unsigned char *block, filter_probes probes)
{
    const unsigned mask = FILTER_BLOCK_BYTES * 8 - 1;
    for (int probe = 0; probe < FILTER_PROBES; probe++) {
        unsigned bit = (unsigned)(probes.z >> (FILTER_PROBE_BITS * probe)) & mask;
        if (!((block[bit >> 3] >> (bit & 7)) & 1))
            return 0;
    }
    return 1;
}

void
filter_block_set(unsigned char *block, filter_probes probes)
{
    const unsigned mask = FILTER_BLOCK_BYTES * 8 - 1;
    for (int probe = 0; probe < FILTER_PROBES; probe++) {
        unsigned bit = (unsigned)(probes.z >> (FILTER_PROBE_BITS * probe)) & mask;
        block[bit >> 3] |= (unsigned char)(1u << (bit & 7));
    }
}

void
filter_prefetch(const unsigned char *filter, uint64_t blocks, filter_probes probes)
{
#if defined(__GNUC__)
    __builtin_prefetch(filter + filter_block(probes, blocks) * FILTER_BLOCK_BYTES, 0, 3);
#else
    (void)filter;
    (void)blocks;
    (void)probes;
#endif
}
