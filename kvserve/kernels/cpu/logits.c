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

/* kv_argmax_rows: out[r] = the index of the largest of row r's first `width` logits, the first of
 * equal ones, a NaN counting as the largest (the first NaN wins): torch.argmax's answer. One pass keeps
 * the largest value of every 256 logits, then only the first block holding the row's maximum is read
 * again. A row with a NaN or an infinity (-inf: a masked token) takes the plain scalar scan. */
#define ARGMAX_BLOCK 256

static int64_t argmax_scalar(const float *row, int64_t width) {
    int64_t best = 0;
    float bv = row[0];
    if (isnan(bv)) return 0;
    for (int64_t t = 1; t < width; t++) {
        const float v = row[t];
        if (isnan(v)) return t;
        if (v > bv) bv = v, best = t;
    }
    return best;
}

static int64_t argmax_row(const float *row, int64_t width) {
    const int64_t nb = width / ARGMAX_BLOCK;
    float bmax[nb > 0 ? nb : 1];
    vf bad = vf_zero();
    for (int64_t b = 0; b < nb; b++) {
        const float *p = row + b * ARGMAX_BLOCK;
        vf m = vf_load(p);
        bad = vf_add(bad, vf_sub(m, m)); /* NaN where a lane is NaN or infinite */
        for (int64_t i = 16; i < ARGMAX_BLOCK; i += 16) {
            const vf v = vf_load(p + i);
            bad = vf_add(bad, vf_sub(v, v));
            m = vf_max(m, v);
        }
        bmax[b] = vf_reduce_max(m);
    }
    if (nb == 0 || isnan(vf_reduce_add(bad))) return argmax_scalar(row, width);
    float m = bmax[0];
    for (int64_t b = 1; b < nb; b++) m = bmax[b] > m ? bmax[b] : m;
    for (int64_t t = nb * ARGMAX_BLOCK; t < width; t++) { /* the tail past the last whole block */
        const float v = row[t];
        if (isnan(v) || isinf(v)) return argmax_scalar(row, width);
        if (v > m) m = v;
    }
    int64_t b = 0;
    while (b < nb && bmax[b] != m) b++;
    for (int64_t t = b * ARGMAX_BLOCK;; t++)
        if (row[t] == m) return t;
}

void kv_argmax_rows(const float *logits, int64_t ld, int64_t width, int64_t n_rows, int64_t *out) {
#pragma omp parallel for schedule(static) if (n_rows > 1)
    for (int64_t r = 0; r < n_rows; r++) out[r] = argmax_row(logits + r * ld, width);
}
