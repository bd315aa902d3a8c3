/* Logit processing that torch would do through several [rows, vocab] temporaries.
 *
 * kv_mask_logits: a grammar's token bitmask applied in place. Row r of `bits` (32 tokens a word,
 * token t allowed when bit t % 32 of word t / 32 is set) masks row rows[r] of `logits`: every
 * token it does not allow becomes -inf. Tokens past `bits_width` (logits wider than the
 * grammar's vocabulary) are never allowed. */
#include <math.h>

#include "common.h"

void kv_mask_logits(float *logits, int64_t ld, int64_t width, const int32_t *bits, int64_t words,
                    const int64_t *rows, int64_t n_rows) {
    const int64_t covered = words * 32 < width ? words * 32 : width;
#pragma omp parallel for schedule(static) if (n_rows > 1)
    for (int64_t r = 0; r < n_rows; r++) {
        float *row = logits + rows[r] * ld;
        const uint32_t *w = (const uint32_t *)bits + r * words;
        for (int64_t t = 0; t < covered; t++)
            if (!((w[t >> 5] >> (t & 31)) & 1u)) row[t] = -INFINITY;
        for (int64_t t = covered; t < width; t++) row[t] = -INFINITY;
    }
}
