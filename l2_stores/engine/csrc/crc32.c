/* CRC-32 as zlib computes it: by tables sliced by 8 for short inputs, by
   carry-less multiplication for long ones where the CPU has it (see crc32.h
   for why not zlib's own). L2_STORES_NO_CLMUL in the environment keeps the
   tables only, for the tests to compare both. */

#include <stdlib.h>
#include <string.h>

#include "crc32.h"

static uint32_t crc_table[8][256];

static void
build_tables(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_table[0][n];
        for (int t = 1; t < 8; t++) {
            c = crc_table[0][c & 0xff] ^ (c >> 8);
            crc_table[t][n] = c;
        }
    }
}

static uint32_t
crc32_tables(uint32_t crc, const unsigned char *p, size_t n)
{
    uint32_t c = crc ^ 0xFFFFFFFFu;
    while (n >= 8) {
        uint32_t one = read_u32(p) ^ c;
        uint32_t two = read_u32(p + 4);
        c = crc_table[7][one & 0xff] ^ crc_table[6][(one >> 8) & 0xff] ^
            crc_table[5][(one >> 16) & 0xff] ^ crc_table[4][one >> 24] ^
            crc_table[3][two & 0xff] ^ crc_table[2][(two >> 8) & 0xff] ^
            crc_table[1][(two >> 16) & 0xff] ^ crc_table[0][two >> 24];
        p += 8;
        n -= 8;
    }
    while (n-- > 0)
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_CLMUL_CRC 1
#include <immintrin.h>

/* The same CRC by carry-less multiplication (folding four 128-bit lanes, then
   one, then a Barrett reduction; the constants are those of the reflected
   polynomial 0xEDB88320 from Intel's "Fast CRC Computation for Generic
   Polynomials Using PCLMULQDQ"). Takes and returns the inverted state, as
   the table loop keeps it; n >= 64 and a multiple of 16. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t
crc32_clmul(uint32_t state, const unsigned char *p, size_t n)
{
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596, 0x0154442bd4);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009e, 0x01751997d0);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124);
    const __m128i poly = _mm_set_epi64x(0x01f7011641, 0x01db710641);
    const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 0));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x4 = _mm_loadu_si128((const __m128i *)(p + 48));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)state));
    p += 64;
    n -= 64;
    while (n >= 64) {
        __m128i x5 = _mm_clmulepi64_si128(x1, k1k2, 0x00);
        __m128i x6 = _mm_clmulepi64_si128(x2, k1k2, 0x00);
        __m128i x7 = _mm_clmulepi64_si128(x3, k1k2, 0x00);
        __m128i x8 = _mm_clmulepi64_si128(x4, k1k2, 0x00);
        x1 = _mm_clmulepi64_si128(x1, k1k2, 0x11);
        x2 = _mm_clmulepi64_si128(x2, k1k2, 0x11);
        x3 = _mm_clmulepi64_si128(x3, k1k2, 0x11);
        x4 = _mm_clmulepi64_si128(x4, k1k2, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(p + 0)));
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(p + 16)));
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(p + 32)));
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    __m128i lanes[3] = {x2, x3, x4};
    for (int i = 0; i < 3; i++) {
        __m128i x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
        x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, lanes[i]), x5);
    }
    while (n >= 16) {
        __m128i x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
        x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, _mm_loadu_si128((const __m128i *)p)), x5);
        p += 16;
        n -= 16;
    }
    /* 128 bits to 64, then the Barrett reduction to 32 */
    __m128i x5 = _mm_clmulepi64_si128(x1, k3k4, 0x10);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x5);
    x5 = _mm_srli_si128(x1, 4);
    x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, low32), k5k0, 0x00);
    x1 = _mm_xor_si128(x1, x5);
    x5 = _mm_clmulepi64_si128(_mm_and_si128(x1, low32), poly, 0x10);
    x5 = _mm_clmulepi64_si128(_mm_and_si128(x5, low32), poly, 0x00);
    x1 = _mm_xor_si128(x1, x5);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}

static int have_clmul;
#endif

static int initialized;

void
crc32_init(void)
{
    if (initialized)
        return;
    build_tables();
#ifdef HAVE_CLMUL_CRC
    __builtin_cpu_init();
    have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1") &&
                 getenv("L2_STORES_NO_CLMUL") == NULL;
#endif
    initialized = 1;
}

uint32_t
crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
#ifdef HAVE_CLMUL_CRC
    if (have_clmul && n >= 64) {
        size_t bulk = n & ~(size_t)15;
        crc = crc32_clmul(crc ^ 0xFFFFFFFFu, p, bulk) ^ 0xFFFFFFFFu;
        p += bulk;
        n -= bulk;
    }
#endif
    return crc32_tables(crc, p, n);
}

int
crc32_clmul_in_use(void)
{
#ifdef HAVE_CLMUL_CRC
    return have_clmul;
#else
    return 0;
#endif
}
