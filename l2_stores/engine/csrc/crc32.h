/* CRC-32 as zlib computes it (reflected polynomial 0xEDB88320, inverted in
   and out): the one checksum of every engine file, shared by both C
   extensions.

   Why not zlib's crc32, which Python's zlib module uses: zlib 1.2.13 (this
   project's build machines) computes inputs shorter than a few hundred
   bytes one byte at a time. Measured with gcc -O2 on the CI machine: 138 ns
   for a 68-byte run row against 30 ns here (4.6 x), 51 ns against 12 ns for
   a 32-byte key, and 1.19 us against about 0.2 us for a 4 KiB index page. A
   find checks two or three of those, so zlib would cost a third of it; the
   issue's bar was 5 %. */

#ifndef L2_CRC32_H
#define L2_CRC32_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

/* Build the tables and look for carry-less multiplication; call once from
   a module's init, before any other function here (idempotent). */
L2_INTERNAL void crc32_init(void);

/* The CRC of p[0 .. n) continuing crc: crc32_update(crc32_update(0, a), b)
   is the CRC of a followed by b, and crc32_update(0, p, n) zlib's crc32. */
L2_INTERNAL uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n);

static inline uint32_t
crc32_of(const unsigned char *p, size_t n)
{
    return crc32_update(0, p, n);
}

/* Whether the carry-less multiplication path is in use (for the tests). */
L2_INTERNAL int crc32_clmul_in_use(void);

#endif
