/* A self-contained driver for cross-ISA checks: builds its inputs from a fixed pseudo-random
 * stream, runs the kernels, and writes every output to stdout as records
 *   [name length u32][name][byte count u64][bytes]
 * Built once per ISA with the kernel sources (e.g. for aarch64 and run under qemu-user, where
 * Python cannot load the library), its records are compared with the scalar build's
 * (tests/kernels/cpu/test_cross_isa.py). Returns 1 on an allocation failure or a kernel error. */
#include <stdio.h>
#include <string.h>

#include "common.h"

void kv_pack_weight(const int8_t *w, int64_t N, int64_t K, int8_t *wp);
void kv_pack_q4(const uint8_t *q, const uint16_t *d, const uint16_t *mn, int64_t N, int64_t K, uint8_t *wp);
void kv_pack_wide(const uint8_t *q, const uint16_t *s, const uint16_t *mn, int64_t N, int64_t K, int64_t H,
                  uint8_t *wp);

void kv_argmax_rows(const float *logits, int64_t ld, int64_t width, int64_t n_rows, int64_t *out);

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) & 0xFFFFFF) / 8388608.0f - 1.0f;
}

static void put(const char *name, const void *p, uint64_t n) {
    const uint32_t len = (uint32_t)strlen(name);
    fwrite(&len, 4, 1, stdout);
    fwrite(name, 1, len, stdout);
    fwrite(&n, 8, 1, stdout);
    fwrite(p, 1, n, stdout);
}

static uint16_t half_bits(float f) { /* float -> fp16, nearest (inputs are small normal values) */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t s = (u >> 16) & 0x8000u, e = (u >> 23) & 0xFF, m = u & 0x7FFFFFu;
    if (e < 113) return (uint16_t)s;
    return (uint16_t)(s | ((e - 112) << 10) | ((m + 0x1000u) >> 13));
}

static uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

int main(void) {
    enum { M = 7, K = 100, N = 40 };
    const int64_t G = (K + GROUP - 1) / GROUP;
    float *x = KV_ALLOC(float, M * K), *dx = KV_ALLOC(float, 2 * M * G), *y = KV_ALLOC(float, M * N);
    uint8_t *xq = KV_ALLOC(uint8_t, M * G * GROUP), *q4 = KV_ALLOC(uint8_t, N * K);
    int8_t *w = KV_ALLOC(int8_t, N * K), *wp = KV_ALLOC(int8_t, ((N + 15) / 16) * 16 * G * GROUP);
    int32_t *corr = KV_ALLOC(int32_t, ((N + 15) / 16) * 16 * G);
    uint16_t *d4 = KV_ALLOC(uint16_t, N * G), *m4 = KV_ALLOC(uint16_t, N * G);
    uint8_t *w4 = KV_ALLOC(uint8_t, ((N + 15) / 16) * G * 320);
    if (!x || !dx || !y || !xq || !q4 || !w || !wp || !corr || !d4 || !m4 || !w4) return 1;
    put("isa", KV_ISA_NAME, strlen(KV_ISA_NAME));
    for (int i = 0; i < M * K; i++) x[i] = 3.0f * frand();
    for (int i = 0; i < 10; i++) x[i] = 0.0f;

    kv_quantize_act(x, M, K, xq, dx);
    put("act_u8", xq, (uint64_t)M * G * GROUP);
    put("act_u8_scale", dx, sizeof(float) * M * G);
    kv_quantize_act_s8(x, M, K, (int8_t *)xq, dx, dx + M * G);
    put("act_s8", xq, (uint64_t)M * G * GROUP);
    put("act_s8_scales", dx, sizeof(float) * 2 * M * G);

    for (int i = 0; i < N * K; i++) w[i] = (int8_t)(127.0f * frand());
    kv_pack_weight(w, N, K, wp);
    for (int64_t b = 0; b < (N + 15) / 16; b++) /* -128 x the group sums, [N16][G][16] */
        for (int64_t g = 0; g < G; g++)
            for (int64_t c = 0; c < 16; c++) {
                int32_t s = 0;
                const int64_t n = b * 16 + c;
                for (int64_t k = g * GROUP; k < (g + 1) * GROUP && k < K && n < N; k++) s += w[n * K + k];
                corr[(b * G + g) * 16 + c] = -128 * s;
            }
    float dw[N];
    for (int i = 0; i < N; i++) dw[i] = 0.01f * (1.5f + frand());
    if (kv_linear(x, M, K, wp, dw, corr, N, y)) return 1;
    put("gemm_q8", y, sizeof(float) * M * N);

    for (int i = 0; i < N * K; i++) q4[i] = (uint8_t)(8.0f + 7.99f * frand());
    for (int i = 0; i < N * G; i++) d4[i] = half_bits(0.02f * (1.5f + frand())), m4[i] = half_bits(-0.15f + 0.05f * frand());
    kv_pack_q4(q4, d4, m4, N, K, w4);
    if (kv_linear_q4(x, M, K, w4, N, y)) return 1;
    put("gemm_q4", y, sizeof(float) * M * N);

    { /* float32, 37 channels (a partial tile of 4) over K = 100 (a partial vector of 16), with a bias */
        float *wf = KV_ALLOC(float, N * K), bias[N];
        if (!wf) return 1;
        for (int i = 0; i < N * K; i++) wf[i] = frand();
        for (int i = 0; i < N; i++) bias[i] = frand();
        if (kv_linear_f32(x, M, K, wf, bias, N - 3, y)) return 1;
        put("gemm_f32", y, sizeof(float) * M * (N - 3));
        free(wf);
    }

    { /* 5-, 6- and 8-bit codes, a scale and minimum per 16 inputs */
        uint16_t *sw = KV_ALLOC(uint16_t, N * 2 * G), *mw = KV_ALLOC(uint16_t, N * 2 * G);
        uint8_t *ww = KV_ALLOC(uint8_t, ((N + 15) / 16) * G * (256 + 64 * 4 + 128));
        int32_t *hs = KV_ALLOC(int32_t, M * G * 2);
        if (!sw || !mw || !ww || !hs) return 1;
        kv_quantize_act_s8h(x, M, K, (int8_t *)xq, dx, dx + M * G, hs);
        put("act_s8h_sums", hs, sizeof(int32_t) * M * G * 2);
        const char *names[3] = {"gemm_w5", "gemm_w6", "gemm_w8"};
        const int64_t hb[3] = {1, 2, 4};
        for (int t = 0; t < 3; t++) {
            const float top = (float)(1 << (4 + hb[t]));
            for (int i = 0; i < N * K; i++) q4[i] = (uint8_t)(top / 2 + (top / 2 - 0.01f) * frand());
            for (int i = 0; i < N * 2 * G; i++)
                sw[i] = half_bits(0.01f * (1.5f + frand())), mw[i] = half_bits(-0.2f + 0.05f * frand());
            kv_pack_wide(q4, sw, mw, N, K, hb[t], ww);
            if (kv_linear_wide(x, M, K, ww, N, hb[t], y)) return 1;
            put(names[t], y, sizeof(float) * M * N);
        }
        free(sw), free(mw), free(ww), free(hs);
    }

    /* attention: 3 sequences over a shuffled paged cache, GQA 4/2 heads, head_dim 64, blocks of 16 */
    enum { B = 3, H = 4, HKV = 2, D = 64, BS = 16, NBLK = 20, W = 8 };
    const int32_t seq_lens[B] = {1, 40, 100}, q_len[B] = {1, 9, 70}, q_start[B] = {0, 1, 10};
    int32_t tables[B * W], perm[NBLK];
    for (int i = 0; i < NBLK; i++) perm[i] = (i * 7 + 3) % NBLK;
    for (int i = 0; i < B * W; i++) tables[i] = perm[i % NBLK];
    const int64_t rows = (int64_t)NBLK * BS * HKV;
    float *kf = KV_ALLOC(float, rows * D), *vf32 = KV_ALLOC(float, rows * D), *ks = KV_ALLOC(float, rows),
          *vs = KV_ALLOC(float, rows), *q = KV_ALLOC(float, 80 * H * D), *out = KV_ALLOC(float, 80 * H * D);
    uint16_t *kb = KV_ALLOC(uint16_t, rows * D), *vb16 = KV_ALLOC(uint16_t, rows * D);
    int8_t *k8 = KV_ALLOC(int8_t, rows * D), *v8 = KV_ALLOC(int8_t, rows * D);
    if (!kf || !vf32 || !ks || !vs || !q || !out || !kb || !vb16 || !k8 || !v8) return 1;
    for (int64_t i = 0; i < rows * D; i++) {
        kf[i] = frand(), vf32[i] = frand();
        kb[i] = bf16_bits(kf[i]), vb16[i] = bf16_bits(vf32[i]);
        k8[i] = (int8_t)(127.0f * kf[i]), v8[i] = (int8_t)(127.0f * vf32[i]);
    }
    for (int64_t i = 0; i < rows; i++) ks[i] = 0.01f * (1.0f + 0.5f * frand()), vs[i] = 0.01f * (1.0f + 0.5f * frand());
    for (int i = 0; i < 80 * H * D; i++) q[i] = frand();
    const void *kc[3] = {kf, kb, k8}, *vc[3] = {vf32, vb16, v8};
    const char *dec_names[3] = {"decode_f32", "decode_bf16", "decode_int8"};
    const char *pre_names[3] = {"prefill_f32", "prefill_bf16", "prefill_int8"};
    for (int dt = 0; dt < 3; dt++) {
        const float *kscale = dt == 2 ? ks : NULL, *vscale = dt == 2 ? vs : NULL;
        if (kv_paged_decode_attention(q, kc[dt], vc[dt], kscale, vscale, dt, tables, W, seq_lens, B, H, HKV, D, BS,
                                      0.125f, out))
            return 1;
        put(dec_names[dt], out, sizeof(float) * B * H * D);
        memset(out, 0, sizeof(float) * 80 * H * D);
        if (kv_paged_prefill_attention(q, kc[dt], vc[dt], kscale, vscale, dt, tables, W, q_start, q_len, seq_lens, B,
                                       H, HKV, D, BS, 0.125f, out))
            return 1;
        put(pre_names[dt], out, sizeof(float) * 80 * H * D);
    }
    /* greedy argmax: rows of 1,000 logits (3 whole blocks and a tail): random, a tie, masked tokens, a NaN */
    enum { AR = 4, AW = 1000 };
    float *lg = KV_ALLOC(float, AR * AW);
    int64_t am[AR];
    if (!lg) return 1;
    for (int i = 0; i < AR * AW; i++) lg[i] = frand();
    lg[1 * AW + 300] = lg[1 * AW + 900] = 5.0f;
    for (int i = 0; i < 400; i++) lg[2 * AW + i] = -__builtin_inff();
    lg[3 * AW + 700] = __builtin_nanf("");
    kv_argmax_rows(lg, AW, AW, AR, am);
    put("argmax", am, sizeof(am));
    free(lg);
    fflush(stdout);
    return 0;
}
