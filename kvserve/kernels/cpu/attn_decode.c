/* Paged decode attention: one query token per sequence, K/V read in place through the block
 * table (no gathered copy). The result of a sequence depends only on its own context.
 * Cache element types: 0 float32, 1 bfloat16, 2 int8 with one float32 scale per token and head. */
#include <math.h>

#include "common.h"

/* The cache is cold when a decode step reaches a layer (the layer's weights have streamed through
 * since): ask for the next block while this one is being used. */
static inline void prefetch_bytes(const char *p, int64_t n) {
    for (int64_t c = 0; c < n; c += 64) kv_prefetch(p + c);
}

/* heads of a group that share each V row load in pass 2, their accumulators in registers (a vf is
 * one AVX-512 register, two AVX2 or four NEON ones) */
#ifndef V2_HEADS
#define V2_HEADS 4
#endif

/* vectors of output columns a pass-2 sweep keeps in registers per head (AVX-512: 4 heads x 4; AVX2,
 * whose vf is two registers: 2 heads x 2, 3 or 4 heads x 1 (PV_COLS); NEON, four: 4 x 1) */
#ifndef V2_COLS
#if defined(KV_ISA_AVX512)
#define V2_COLS 4
#elif defined(KV_ISA_AVX2)
#define V2_COLS 2
#else
#define V2_COLS 1
#endif
#endif

/* po[h] += sum_o p[h][o] * vs[o] * v[o] for hc heads (score rows sp + h * ldp, outputs op + h * D) over
 * m rows of one KV head (element vi + o * vstride of vbase, cache type dt, or PV_F32_SCALED: int8 rows
 * converted to float32, scales still to apply), for nc vectors of output
 * columns: hc x nc accumulators, each summing its rows in order (o = 0, 1, ...), independent of each
 * other so the core overlaps them; hc, nc and dt are constants at every call site, so the accumulators
 * stay in registers and each V vector is loaded (converted) once for the hc heads */
#define PV_F32_SCALED 4
static inline __attribute__((always_inline)) void pv_cols(const int hc, const int nc, const int dt, const float *sp,
                                                          int64_t ldp, const void *vbase, int64_t vi, int64_t vstride,
                                                          const float *vsc, int64_t Hkv, int64_t m, int64_t D,
                                                          float *op) {
    vf acc[V2_HEADS][V2_COLS];
    for (int h = 0; h < hc; h++)
        for (int c = 0; c < nc; c++) acc[h][c] = vf_load(op + h * D + 16 * c);
    for (int64_t o = 0; o < m; o++) {
        vf v[V2_COLS];
        for (int c = 0; c < nc; c++) v[c] = vf_load_cache(vbase, vi + o * vstride + 16 * c, dt == PV_F32_SCALED ? 0 : dt);
        const int scaled = dt == 2 || dt == PV_F32_SCALED;
        const float vs = scaled ? vsc[o * Hkv] : 1.0f; /* int8: each token's V scale */
        for (int h = 0; h < hc; h++) {
            const vf p = vf_set1(scaled ? sp[h * ldp + o] * vs : sp[h * ldp + o]);
            for (int c = 0; c < nc; c++) acc[h][c] = vf_fmadd(p, v[c], acc[h][c]);
        }
    }
    for (int h = 0; h < hc; h++)
        for (int c = 0; c < nc; c++) vf_store(op + h * D + 16 * c, acc[h][c]);
}

/* vectors of columns per sweep for hc heads: on AVX2 three or four heads take one (their 6-8 registers of
 * accumulators, the V vector and the broadcasts fit the 16; two vectors spilled an accumulator, a
 * store-to-load chain through every token) */
#if defined(KV_ISA_AVX2)
#define PV_COLS(hc) ((hc) >= 3 ? 1 : V2_COLS)
#else
#define PV_COLS(hc) V2_COLS
#endif

/* the same over all D output columns, PV_COLS(hc) vectors at a time (then one) */
static inline __attribute__((always_inline)) void pv_heads(const int hc, const int dt, const float *sp, int64_t ldp,
                                                           const void *vbase, int64_t vi, int64_t vstride,
                                                           const float *vsc, int64_t Hkv, int64_t m, int64_t D,
                                                           float *op) {
    int64_t d0 = 0;
    for (; d0 + 16 * PV_COLS(hc) <= D; d0 += 16 * PV_COLS(hc))
        pv_cols(hc, PV_COLS(hc), dt, sp, ldp, vbase, vi + d0, vstride, vsc, Hkv, m, D, op + d0);
    for (; d0 < D; d0 += 16) pv_cols(hc, 1, dt, sp, ldp, vbase, vi + d0, vstride, vsc, Hkv, m, D, op + d0);
}

/* pv_heads with the head count (1 .. V2_HEADS) and cache type as constants */
#define PV_DT(hc)                                                                                           \
    switch (dt) {                                                                                            \
    case 0: pv_heads(hc, 0, sp, ldp, vbase, vi, vstride, vsc, Hkv, m, D, op); break;                         \
    case 1: pv_heads(hc, 1, sp, ldp, vbase, vi, vstride, vsc, Hkv, m, D, op); break;                         \
    case 2: pv_heads(hc, 2, sp, ldp, vbase, vi, vstride, vsc, Hkv, m, D, op); break;                         \
    case 3: pv_heads(hc, 3, sp, ldp, vbase, vi, vstride, vsc, Hkv, m, D, op); break;                         \
    default: pv_heads(hc, PV_F32_SCALED, sp, ldp, vbase, vi, vstride, vsc, Hkv, m, D, op); break;            \
    }
static void pv_group(int64_t hc, int dt, const float *sp, int64_t ldp, const void *vbase, int64_t vi, int64_t vstride,
                     const float *vsc, int64_t Hkv, int64_t m, int64_t D, float *op) {
    switch (hc) {
    case 1: PV_DT(1) break;
    case 2: PV_DT(2) break;
    case 3: PV_DT(3) break;
    case 4: PV_DT(4) break;
#if V2_HEADS > 4
    case 5: PV_DT(5) break;
    case 6: PV_DT(6) break;
    case 7: PV_DT(7) break;
    case 8: PV_DT(8) break;
#endif
    }
}
#undef PV_DT

/* Pass 1's register tile: ATT_TT tokens x ATT_GH heads of a group, each K vector loaded once for the
 * heads beside it (AVX-512: 4 x 4 of 32 registers; AVX2, whose vf is two registers: 2 x 3; NEON: 4 x 1) */
#ifndef ATT_TT
#if defined(KV_ISA_AVX512)
#define ATT_TT 4
#define ATT_GH 4
#elif defined(KV_ISA_AVX2)
#define ATT_TT 2
#define ATT_GH 3
#else
#define ATT_TT 4
#define ATT_GH 1
#endif
#endif
/* whether a lone row reads a 16-bit or int8 cache in place, converting each vector as it is loaded for the
 * tile's heads (x86: F16C / VCVTPH2PS from memory), rather than converting the block into a buffer first;
 * NEON, one head per tile, keeps the buffer (not measured on ARM) */
_Static_assert(4 % ATT_TT == 0, "pass 1 runs 4-token groups in tiles of ATT_TT tokens");
#ifndef ATT_IN_PLACE
#define ATT_IN_PLACE (ATT_GH > 1)
#endif

/* so[h * span + i] = q_h . k_i (unscaled) for tt tokens (element ki + i * ks of kbase, cache type dt)
 * and gh heads (rows qh + h * D). Each dot sums its products lane by lane in increasing d, then
 * vf_reduce_add4's tree, which treats each of its four inputs alike: a score's bits do not depend on
 * the tile that computed it. */
static inline __attribute__((always_inline)) void score_tile(const int tt, const int gh, const int dt, const float *qh,
                                                             const void *kbase, int64_t ki, int64_t ks, int64_t D,
                                                             float *so, int64_t span) {
    vf acc[ATT_TT * ATT_GH];
    for (int a = 0; a < tt * gh; a++) acc[a] = vf_zero();
    for (int64_t d = 0; d < D; d += 16) {
        vf kv[ATT_TT];
        for (int i = 0; i < tt; i++) kv[i] = vf_load_cache(kbase, ki + i * ks + d, dt);
        for (int h = 0; h < gh; h++) {
            const vf qv = vf_load(qh + h * D + d);
            for (int i = 0; i < tt; i++) acc[i * gh + h] = vf_fmadd(qv, kv[i], acc[i * gh + h]);
        }
    }
    float s[ATT_TT * ATT_GH + 3];
    for (int a = 0; a < tt * gh; a += 4)
        vf_reduce_add4(acc[a], a + 1 < tt * gh ? acc[a + 1] : vf_zero(), a + 2 < tt * gh ? acc[a + 2] : vf_zero(),
                       a + 3 < tt * gh ? acc[a + 3] : vf_zero(), s + a);
    for (int i = 0; i < tt; i++)
        for (int h = 0; h < gh; h++) so[h * span + i] = s[i * gh + h];
}

#define ST_DT(gh)                                                                                           \
    switch (dt) {                                                                                            \
    case 0: score_tile(ATT_TT, gh, 0, qh, kbase, k, ks, D, so, span); break;                                 \
    case 1: score_tile(ATT_TT, gh, 1, qh, kbase, k, ks, D, so, span); break;                                 \
    case 2: score_tile(ATT_TT, gh, 2, qh, kbase, k, ks, D, so, span); break;                                 \
    default: score_tile(ATT_TT, gh, 3, qh, kbase, k, ks, D, so, span); break;                                \
    }
/* unscaled scores of 4 tokens (elements ki + i * ks of kbase, type dt) for heads h0 .. h0 + gc - 1:
 * sr[h * span + i] */
static void score_heads(const float *qb, const void *kbase, int64_t ki, int64_t ks, int dt, int64_t h0, int64_t gc,
                        int64_t D, float *sr, int64_t span) {
    for (int64_t h = h0; h < h0 + gc;) {
        const int64_t gh = h0 + gc - h < ATT_GH ? h0 + gc - h : ATT_GH;
        for (int i0 = 0; i0 < 4; i0 += ATT_TT) {
            const float *qh = qb + h * D;
            const int64_t k = ki + i0 * ks;
            float *so = sr + h * span + i0;
            switch (gh) { /* constant tile shapes */
            case 1: ST_DT(1) break;
#if ATT_GH >= 2
            case 2: ST_DT(2) break;
#endif
#if ATT_GH >= 3
            case 3: ST_DT(3) break;
#endif
#if ATT_GH >= 4
            case 4: ST_DT(4) break;
#endif
            }
        }
        h += gh;
    }
}
#undef ST_DT

/* n rows of one KV head (from cache row row0, stride Hkv) converted to float32 into buf (stride D) */
static inline void head_rows(const void *cache, int dtype, int64_t row0, int64_t n, int64_t Hkv, int64_t D, float *buf) {
    for (int64_t r = 0; r < n; r++)
        for (int64_t d = 0; d < D; d += 16) vf_store(buf + r * D + d, vf_load_cache(cache, (row0 + r * Hkv) * D + d, dtype));
}
#define SPLIT_BLOCKS 4 /* a sequence is attended in parts of this many blocks (merged by log-sum-exp) */
#define GROUP_ROWS 16  /* at most this many rows over one block table share a task */

/* Whether rows a and b read the same blocks wherever both have them (a speculative verify's rows, a
 * prompt's one-token rows in the fused step: one request's tokens over its own table). */
static int same_table(const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens, int64_t a, int64_t b,
                      int64_t bs) {
    const int64_t la = (seq_lens[a] + bs - 1) / bs, lb = (seq_lens[b] + bs - 1) / bs, n = la < lb ? la : lb;
    for (int64_t i = 0; i < n; i++)
        if (block_tables[a * bt_stride + i] != block_tables[b * bt_stride + i]) return 0;
    return 1;
}

/* A task is one part (SPLIT_BLOCKS blocks) of a group of rows over one block table, all heads: a
 * block's K (then V) rows are read and converted to float32 once for every row of the group, and a
 * long context spreads over threads. Each row keeps per part and head its max score, its sum of
 * exponentials and its unnormalised output; a row's parts are merged in order. Every row takes the
 * operations it would take alone, in the same order (its parts, its 4-token groups and tails follow
 * its own length), so its result depends on nothing but its own context: not on the batch, the rows
 * beside it or the thread count. Returns 0, or -1 when scratch memory ran out. */
int kv_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache, const float *k_scale,
                              const float *v_scale, int dtype, const int32_t *block_tables, int64_t bt_stride,
                              const int32_t *seq_lens, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
                              float scale, float *out) {
    const int64_t group = H / Hkv, nd = D / 16, esz = kv_cache_esize(dtype), span = SPLIT_BLOCKS * bs;
    const int64_t rowb = Hkv * D * esz; /* one token's K (or V) row, all heads */
    /* first[b]: row b's first part; rows g0[j] .. g0[j + 1] - 1 form group j, whose tasks start at gt[j] */
    int64_t *first = KV_ALLOC(int64_t, 3 * (B + 1)), *g0 = first + B + 1, *gt = g0 + B + 1;
    if (!first) return -1;
    int64_t work = 0, ng = 0;
    first[0] = gt[0] = 0;
    for (int64_t b = 0, lead = 0; b < B; b++) {
        const int64_t nblk = (seq_lens[b] + bs - 1) / bs;
        first[b + 1] = first[b] + (nblk + SPLIT_BLOCKS - 1) / SPLIT_BLOCKS;
        work += seq_lens[b];
        if (b == 0 || b - g0[ng - 1] >= GROUP_ROWS || !same_table(block_tables, bt_stride, seq_lens, lead, b, bs)) {
            g0[ng++] = b;
            lead = b;
        } else if (seq_lens[b] > seq_lens[lead]) {
            lead = b; /* the group's longest row: its table has every block the group reads */
        }
    }
    g0[ng] = B;
    for (int64_t j = 0; j < ng; j++) {
        int64_t most = 0;
        for (int64_t b = g0[j]; b < g0[j + 1]; b++) most = first[b + 1] - first[b] > most ? first[b + 1] - first[b] : most;
        gt[j + 1] = gt[j] + most;
    }
    const int64_t tasks = gt[ng];
    int64_t widest = 1; /* rows of the largest group: what a thread's scores buffer holds */
    for (int64_t j = 0; j < ng; j++) widest = g0[j + 1] - g0[j] > widest ? g0[j + 1] - g0[j] : widest;
    /* per row, part and head: max, sum, then D outputs */
    float *part = KV_ALLOC(float, first[B] * H * (D + 2));
    if (!part) {
        free(first);
        return -1;
    }
    int failed = 0;
#pragma omp parallel if (tasks > 1 && work * H * D >= (1 << 16))
    {
        /* scores of each row of a group, then one block's rows of every KV head as float32 */
        float *scores = KV_ALLOC(float, widest * H * span + Hkv * bs * D), *hbuf = scores + widest * H * span;
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!scores) continue;
            int64_t j = 0;
            while (gt[j + 1] <= task) j++;
            const int64_t p = task - gt[j], r0 = g0[j], R = g0[j + 1] - r0, blk0 = p * SPLIT_BLOCKS, t0 = blk0 * bs;
            int64_t n[GROUP_ROWS], nmax = 0, lead = r0;
            for (int64_t r = 0; r < R; r++) { /* this part's tokens of each row (0: the row ends before it) */
                const int64_t L = seq_lens[r0 + r];
                n[r] = L <= t0 ? 0 : (L < t0 + span ? L : t0 + span) - t0;
                if (n[r] > nmax) nmax = n[r], lead = r0 + r;
            }
            const int32_t *bt = block_tables + lead * bt_stride;
            /* K and V rows read in place (a lone row, or a float32 cache), or, for a group of rows over one
             * table, each block converted once into hbuf for all of them */
            const int conv = dtype != 0 && (R > 1 || !ATT_IN_PLACE), kdt = conv ? 0 : dtype;
            const int vdt = !conv ? dtype : dtype == 2 ? PV_F32_SCALED : 0;
            prefetch_bytes((const char *)k_cache + (int64_t)bt[blk0] * bs * rowb, bs * rowb);
            /* pass 1: scores[(r * H + h) * span + t] = scale * q_(r,h) . k_t */
            for (int64_t t = 0; t < nmax; t += bs) {
                const int64_t slot0 = (int64_t)bt[blk0 + t / bs] * bs, mmax = nmax - t < bs ? nmax - t : bs;
                /* the next block's K rows and this block's V rows while this block's K rows are used, a
                 * few lines per token rather than a block at once (a burst fills the miss buffers and
                 * stalls the core), so pass 2 finds V in cache */
                const char *nk = t + bs < nmax ? (const char *)k_cache + (int64_t)bt[blk0 + t / bs + 1] * bs * rowb : NULL;
                const char *cv = (const char *)v_cache + slot0 * rowb;
                const void *kbase = conv ? (const void *)hbuf : k_cache;
                const int64_t ks = conv ? D : Hkv * D;
                if (conv)
                    for (int64_t kvh = 0; kvh < Hkv; kvh++)
                        head_rows(k_cache, dtype, slot0 * Hkv + kvh, mmax, Hkv, D, hbuf + kvh * bs * D);
#define K_AT(kvh, o) (conv ? (kvh) * bs * D + (o) * D : (slot0 * Hkv + (kvh)) * D + (o) * Hkv * D)
                for (int64_t r = 0; r < R; r++) {
                    const int64_t m = n[r] - t < bs ? n[r] - t : bs, m4 = m & ~(int64_t)3;
                    if (m <= 0) continue; /* the row ends before this block */
                    const float *qb = q + (r0 + r) * H * D;
                    float *sr = scores + r * H * span + t;
                    for (int64_t o = 0; o < m4; o += 4) { /* four tokens at a time: the reduction network of four dots */
                        if (r == 0) { /* prefetching paced by the first row's dots */
                            if (nk) prefetch_bytes(nk + o * rowb, 4 * rowb);
                            prefetch_bytes(cv + o * rowb, 4 * rowb);
                        }
                        for (int64_t kvh = 0; kvh < Hkv; kvh++)
                            score_heads(qb, kbase, K_AT(kvh, o), ks, kdt, kvh * group, group, D, sr + o, span);
                    }
                    for (int64_t o = m4; o < m; o++) {
                        if (r == 0) {
                            if (nk) prefetch_bytes(nk + o * rowb, rowb);
                            prefetch_bytes(cv + o * rowb, rowb);
                        }
                        for (int64_t kvh = 0; kvh < Hkv; kvh++) {
                            const int64_t k1 = K_AT(kvh, o);
                            for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
                                vf acc = vf_zero();
                                for (int64_t d = 0; d < nd; d++)
                                    acc = vf_fmadd(vf_load(qb + h * D + 16 * d), vf_load_cache(kbase, k1 + 16 * d, kdt), acc);
                                sr[h * span + o] = vf_reduce_add(acc);
                            }
                        }
                    }
                    /* the scale (int8: times each token's K scale), applied once per score */
                    for (int64_t h = 0; h < H; h++)
                        for (int64_t o = 0; o < m; o++)
                            sr[h * span + o] *= (dtype == 2 ? k_scale[(slot0 + o) * Hkv + h / group] : 1.0f) * scale;
                }
#undef K_AT
            }
            /* local softmax statistics per row and head; scores become exp(s - max) */
            for (int64_t r = 0; r < R; r++) {
                if (!n[r]) continue;
                float *pm = part + (first[r0 + r] + p) * H * (D + 2), *pl = pm + H, *po = pl + H;
                for (int64_t h = 0; h < H; h++) {
                    float *sc = scores + (r * H + h) * span;
                    const int64_t nr = n[r];
                    vf mx = vf_set1(-INFINITY);
                    for (int64_t t = 0; t < nr; t += 16) mx = vf_max(mx, vf_first_n(vf_load_n(sc + t, nr - t), nr - t, -INFINITY));
                    const float mxs = vf_reduce_max(mx);
                    const vf mv = vf_set1(mxs);
                    vf sum = vf_zero();
                    for (int64_t t = 0; t < nr; t += 16) {
                        const vf e = vf_first_n(vf_exp(vf_sub(vf_load_n(sc + t, nr - t), mv)), nr - t, 0.0f);
                        sum = vf_add(sum, e);
                        vf_store_n(sc + t, e, nr - t);
                    }
                    pm[h] = mxs;
                    pl[h] = vf_reduce_add(sum);
                }
                for (int64_t i = 0; i < H * D; i++) po[i] = 0.0f;
            }
            /* pass 2: po_h = sum_t p[h, t] * v_t, block by block (a block's V rows stay in L1 while each
             * row's head groups sweep them: read in place, or converted once for a group of rows), a few
             * heads' accumulators in registers */
            for (int64_t t = 0; t < nmax; t += bs) {
                const int64_t slot0 = (int64_t)bt[blk0 + t / bs] * bs, mmax = nmax - t < bs ? nmax - t : bs;
                for (int64_t kvh = 0; kvh < Hkv; kvh++) {
                    if (conv) head_rows(v_cache, dtype, slot0 * Hkv + kvh, mmax, Hkv, D, hbuf);
                    const void *vbase = conv ? (const void *)hbuf : v_cache;
                    const int64_t vi = conv ? 0 : (slot0 * Hkv + kvh) * D, vstride = conv ? D : Hkv * D;
                    const float *vsc = dtype == 2 ? v_scale + slot0 * Hkv + kvh : NULL;
                    for (int64_t r = 0; r < R; r++) {
                        const int64_t m = n[r] - t < bs ? n[r] - t : bs;
                        if (m <= 0) continue;
                        float *po = part + (first[r0 + r] + p) * H * (D + 2) + 2 * H;
                        for (int64_t h0 = kvh * group; h0 < (kvh + 1) * group; h0 += V2_HEADS) {
                            const int64_t left = (kvh + 1) * group - h0;
                            pv_group(left < V2_HEADS ? left : V2_HEADS, vdt, scores + (r * H + h0) * span + t, span,
                                     vbase, vi, vstride, vsc, Hkv, m, D, po + h0 * D);
                        }
                    }
                }
            }
        }
        free(scores);
    }
    if (failed) {
        free(part), free(first);
        return -1;
    }
    /* merge each sequence's parts in order: out_h = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p */
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            float M = -INFINITY;
            for (int64_t t = first[b]; t < first[b + 1]; t++) {
                const float mt = part[t * H * (D + 2) + h];
                M = mt > M ? mt : M;
            }
            float l = 0.0f;
            float *o = out + (b * H + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t t = first[b]; t < first[b + 1]; t++) {
                const float *pm = part + t * H * (D + 2);
                const float w = expf(pm[h] - M);
                l += w * pm[H + h];
                const float *po = pm + 2 * H + h * D;
                for (int64_t d = 0; d < D; d++) o[d] += w * po[d];
            }
            const float inv = 1.0f / l;
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
        }
    free(part), free(first);
    return 0;
}
