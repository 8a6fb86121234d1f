/* What every engine C file shares: the mark of symbols shared between an
   extension's files but not exported from it, and the little-endian byte
   helpers of the formats. */

#ifndef L2_INTERNAL_H
#define L2_INTERNAL_H

#include <stdint.h>

#if defined(__GNUC__)
#define L2_INTERNAL __attribute__((visibility("hidden")))
#else
#define L2_INTERNAL
#endif

static inline uint32_t
read_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline uint64_t
read_u64(const unsigned char *p)
{
    return (uint64_t)read_u32(p) | ((uint64_t)read_u32(p + 4) << 32);
}

static inline void
write_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void
write_u64(unsigned char *p, uint64_t v)
{
    write_u32(p, (uint32_t)v);
    write_u32(p + 4, (uint32_t)(v >> 32));
}

#endif
