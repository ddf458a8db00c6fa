/* Instrumented stand-ins for the sanitizer and fuzzer builds of the cache
 * reader (tests/test_asan.py, tests/test_fuzz.py); never in the modules.
 *
 * Built with -Dmmap=sc_test_mmap -Dmunmap=sc_test_munmap, the reader's
 * "mapping" is a heap block of exactly the file's size, so ASan reports a
 * read even one byte past the end (a real mmap would return the zeros of the
 * last page). crc32 (zlib's polynomial and conventions) is compiled here, with
 * the sanitizer, because libz is not instrumented: a CRC over bytes past the
 * end of the file must be reported too. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include "test_harness.h"

#ifdef mmap
void *sc_test_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    (void)addr, (void)prot, (void)flags;
    char *p = malloc(len ? len : 1);
    if (!p)
        return MAP_FAILED;
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, p + done, len - done, off + (off_t)done);
        if (n <= 0) {
            free(p);
            return MAP_FAILED;
        }
        done += (size_t)n;
    }
    return p;
}

int sc_test_munmap(void *addr, size_t len) {
    (void)len;
    free(addr);
    return 0;
}
#endif

uLong crc32(uLong crc, const Bytef *buf, uInt len) {
    static uint32_t table[256];
    if (!table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    if (!buf)
        return 0;
    uint32_t c = (uint32_t)crc ^ 0xFFFFFFFFu;
    for (uInt i = 0; i < len; i++)
        c = table[(c ^ buf[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}
