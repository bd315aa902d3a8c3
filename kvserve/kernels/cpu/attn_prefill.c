/* Paged prefill attention: sequences with several new tokens (a prompt, a chunk of one, or the
 * tail of a prompt whose prefix is cached), K/V read in place through the block table, causal.
 * A task is one KV head of up to PF_CHUNK new tokens of one sequence; its rows are (token, head
 * of the group). Keys come in panels of PF_KEYS (dequantized, scaled, K transposed), and every row
 * keeps its own running max, sum and output over the panels it can see, PF_TILE rows per register
 * tile. A row's arithmetic depends only on its position and its sequence's K/V, not on the chunk
 * or the tile it falls in: a prompt gives the same numbers in one piece, in chunks, or after a
 * cached prefix. q, out [T, H, D]; sequence b has q_len[b] new tokens from row q_start[b]
 * (0: skipped), the last of seq_lens[b] positions. Returns 0, or -1 when scratch memory ran out. */
#include <math.h>

#include "common.h"

#ifndef PF_CHUNK
#define PF_CHUNK 32
#endif
#ifndef PF_TILE
#define PF_TILE 6
#endif
#define PF_KEYS 64
#define PF_NV (PF_KEYS / 16)
/* register tiles: PF_TILE rows x PF_SV vectors of 16 scores, PF_TILE rows x PF_OD vectors of 16
 * outputs. AVX-512 has 32 registers of one vector each; AVX2 16 registers and NEON 32 of a
 * quarter vector (a vf is two or four of them), so a wider tile there would spill in the inner loop */
#ifndef PF_SV
#if defined(KV_ISA_AVX512)
#define PF_SV 4
#define PF_OD 4
#else
#define PF_SV 1
#define PF_OD 1
#endif
#endif

int kv_paged_prefill_attention(const float *q, const void *k_cache, const void *v_cache, const float *k_scale,
                               const float *v_scale, int dtype, const int32_t *block_tables, int64_t bt_stride,
                               const int32_t *q_start, const int32_t *q_len, const int32_t *seq_lens, int64_t B,
                               int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale, float *out) {
    const int64_t group = H / Hkv, nd = D / 16, maxrows = PF_CHUNK * group;
    int64_t *first = KV_ALLOC(int64_t, B + 1);
    if (!first) return -1;
    double work = 0;
    first[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        first[b + 1] = first[b] + (q_len[b] + PF_CHUNK - 1) / PF_CHUNK * Hkv;
        work += (double)q_len[b] * seq_lens[b];
    }
    const int64_t tasks = first[B];
    int failed = 0;
#pragma omp parallel if (tasks > 1 && work * H * D >= (1 << 18))
    {
        float *kt = KV_ALLOC(float, D * PF_KEYS);        /* [D][PF_KEYS] scaled K^T */
        float *vb = KV_ALLOC(float, PF_KEYS * D);        /* [PF_KEYS][D] */
        float *acc = KV_ALLOC(float, maxrows * (D + 2)); /* per row: output, max, sum */
        const int ok = kt && vb && acc;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        float pbuf[PF_TILE][PF_KEYS]; /* a tile's scores, then probabilities */
        memset(pbuf, 0, sizeof pbuf);  /* keys past a tile's view are masked, never uninitialised */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!ok) continue;
            int64_t b = 0;
            while (first[b + 1] <= task) b++;
            const int64_t kvh = (task - first[b]) % Hkv, chunk = (task - first[b]) / Hkv;
            const int64_t n = q_len[b], L = seq_lens[b], j0 = chunk * PF_CHUNK;
            const int64_t nt = n - j0 < PF_CHUNK ? n - j0 : PF_CHUNK, rows = nt * group;
            const int64_t pos0 = L - n + j0, pmax = pos0 + nt - 1; /* positions of the task's tokens */
            const int32_t *bt = block_tables + b * bt_stride;
            float *O = acc, *mx = acc + maxrows * D, *sm = mx + maxrows;
            for (int64_t r = 0; r < rows; r++) {
                mx[r] = -INFINITY;
                sm[r] = 0.0f;
                for (int64_t d = 0; d < D; d++) O[r * D + d] = 0.0f;
            }
            for (int64_t t0 = 0; t0 <= pmax; t0 += PF_KEYS) {
                const int64_t m = L - t0 < PF_KEYS ? L - t0 : PF_KEYS;
                for (int64_t j = 0; j < PF_KEYS; j++) {
                    if (j >= m) {
                        for (int64_t d = 0; d < D; d++) kt[d * PF_KEYS + j] = vb[j * D + d] = 0.0f;
                        continue;
                    }
                    const int64_t t = t0 + j, row = ((int64_t)bt[t / bs] * bs + t % bs) * Hkv + kvh;
                    const float ks = (dtype == 2 ? k_scale[row] : 1.0f) * scale, vs = dtype == 2 ? v_scale[row] : 1.0f;
                    for (int64_t d = 0; d < nd; d++) {
                        float tmp[16];
                        vf_store(tmp, vf_mul(vf_load_cache(k_cache, row * D + 16 * d, dtype), vf_set1(ks)));
                        for (int e = 0; e < 16; e++) kt[(16 * d + e) * PF_KEYS + j] = tmp[e];
                        vf_store(vb + j * D + 16 * d, vf_mul(vf_load_cache(v_cache, row * D + 16 * d, dtype), vf_set1(vs)));
                    }
                }
                /* rows are token-major, so positions grow with the row: skip the rows that see none of this panel */
                for (int64_t r0 = t0 > pos0 ? (t0 - pos0) * group : 0; r0 < rows; r0 += PF_TILE) {
                    const int64_t rc = rows - r0 < PF_TILE ? rows - r0 : PF_TILE;
                    const float *qr[PF_TILE];
                    for (int64_t i = 0; i < PF_TILE; i++) { /* rows past rc repeat the last: computed, not kept */
                        const int64_t r = r0 + (i < rc ? i : rc - 1);
                        qr[i] = q + ((int64_t)q_start[b] + j0 + r / group) * H * D + (kvh * group + r % group) * D;
                    }
                    const int64_t kend = pos0 + (r0 + rc - 1) / group - t0 + 1; /* keys any row of the tile sees */
                    /* raw scores into pbuf, PF_SV vectors of keys at a time (none past what the tile sees) */
                    for (int64_t v0 = 0; v0 < PF_NV && 16 * v0 < kend; v0 += PF_SV) {
                        vf s[PF_TILE][PF_SV];
                        for (int i = 0; i < PF_TILE; i++)
                            for (int v = 0; v < PF_SV; v++) s[i][v] = vf_zero();
                        for (int64_t d = 0; d < D; d++) {
                            vf kd[PF_SV];
                            for (int v = 0; v < PF_SV; v++) kd[v] = vf_load(kt + d * PF_KEYS + 16 * (v0 + v));
                            for (int i = 0; i < PF_TILE; i++) {
                                const vf qd = vf_set1(qr[i][d]);
                                for (int v = 0; v < PF_SV; v++) s[i][v] = vf_fmadd(qd, kd[v], s[i][v]);
                            }
                        }
                        for (int64_t i = 0; i < rc; i++)
                            for (int v = 0; v < PF_SV; v++) vf_store(pbuf[i] + 16 * (v0 + v), s[i][v]);
                    }
                    float alpha[PF_TILE];
                    for (int64_t i = 0; i < rc; i++) {
                        const int64_t r = r0 + i, see = pos0 + r / group - t0 + 1; /* keys of the panel this row sees */
                        vf vmax = vf_set1(-INFINITY);
                        for (int v = 0; v < PF_NV; v++)
                            vmax = vf_max(vmax, vf_first_n(vf_load(pbuf[i] + 16 * v), see - 16 * v, -INFINITY));
                        const float pm = vf_reduce_max(vmax);
                        const float mnew = pm > mx[r] ? pm : mx[r];
                        const vf mv = vf_set1(mnew);
                        vf sum = vf_zero();
                        for (int v = 0; v < PF_NV; v++) {
                            const vf p = vf_first_n(vf_exp(vf_sub(vf_load(pbuf[i] + 16 * v), mv)), see - 16 * v, 0.0f);
                            sum = vf_add(sum, p);
                            vf_store(pbuf[i] + 16 * v, p);
                        }
                        alpha[i] = expf(mx[r] - mnew);
                        sm[r] = sm[r] * alpha[i] + vf_reduce_add(sum);
                        mx[r] = mnew;
                    }
                    const int64_t jn = kend < m ? kend : m;
                    /* o += p v, PF_OD x 16 output columns of every row of the tile in registers at a time */
                    for (int64_t d0 = 0; d0 < nd; d0 += PF_OD) {
                        const int dc = nd - d0 < PF_OD ? (int)(nd - d0) : PF_OD;
                        vf o[PF_TILE][PF_OD];
                        for (int64_t i = 0; i < rc; i++)
                            for (int d = 0; d < dc; d++)
                                o[i][d] = vf_mul(vf_load(O + (r0 + i) * D + 16 * (d0 + d)), vf_set1(alpha[i]));
                        if (dc == PF_OD && rc == PF_TILE) {
                            for (int64_t j = 0; j < jn; j++) {
                                vf v[PF_OD];
                                for (int d = 0; d < PF_OD; d++) v[d] = vf_load(vb + j * D + 16 * (d0 + d));
                                for (int i = 0; i < PF_TILE; i++) {
                                    const vf pj = vf_set1(pbuf[i][j]);
                                    for (int d = 0; d < PF_OD; d++) o[i][d] = vf_fmadd(pj, v[d], o[i][d]);
                                }
                            }
                        } else {
                            for (int64_t j = 0; j < jn; j++)
                                for (int d = 0; d < dc; d++) {
                                    const vf v = vf_load(vb + j * D + 16 * (d0 + d));
                                    for (int64_t i = 0; i < rc; i++) o[i][d] = vf_fmadd(vf_set1(pbuf[i][j]), v, o[i][d]);
                                }
                        }
                        for (int64_t i = 0; i < rc; i++)
                            for (int d = 0; d < dc; d++) vf_store(O + (r0 + i) * D + 16 * (d0 + d), o[i][d]);
                    }
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                float *dst = out + ((int64_t)q_start[b] + j0 + r / group) * H * D + (kvh * group + r % group) * D;
                const vf inv = vf_set1(1.0f / sm[r]);
                for (int64_t d = 0; d < nd; d++) vf_store(dst + 16 * d, vf_mul(vf_load(O + r * D + 16 * d), inv));
            }
        }
        free(kt), free(vb), free(acc);
    }
    free(first);
    return failed ? -1 : 0;
}
