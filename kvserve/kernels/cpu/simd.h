/* The vector layer every kernel is written against: 16 float lanes (vf), 16 int32 lanes (vi) and
 * 64 bytes (vb), one implementation per ISA, chosen at compile time:
 *
 *   KV_ISA_AVX512  AVX-512 F/BW/VL/DQ + VNNI: one register per vector
 *   KV_ISA_AVX2    AVX2 + FMA + F16C: two 256-bit registers per vector (with __AVXVNNI__, the
 *                  "avxvnni" variant: VPDPBUSD on 256-bit registers, Alder Lake and later)
 *   KV_ISA_NEON    AArch64 Advanced SIMD (+ dotprod where present): four 128-bit registers
 *   (none)         portable scalar C: the reference every variant is tested against
 *
 * Integer dot products are exact on every ISA, so a kernel's int32 sums are the same everywhere;
 * float results agree to rounding (reduction trees differ by ISA).
 */
#ifndef KV_SIMD_H
#define KV_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(KV_ISA_AVX512) || defined(KV_ISA_AVX2)
#include <immintrin.h>
#define kv_prefetch(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define kv_prefetch_l2(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
#elif defined(KV_ISA_NEON)
#include <arm_neon.h>
#define kv_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
#define kv_prefetch_l2(p) __builtin_prefetch((const void *)(p), 0, 2)
#else
#define kv_prefetch(p) ((void)(p))
#define kv_prefetch_l2(p) ((void)(p))
#endif

#if defined(KV_ISA_AVX512)
#define KV_ISA_NAME "avx512"
#elif defined(KV_ISA_AVX2) && defined(__AVXVNNI__)
#define KV_ISA_NAME "avxvnni"
#elif defined(KV_ISA_AVX2)
#define KV_ISA_NAME "avx2"
#elif defined(KV_ISA_NEON)
#define KV_ISA_NAME "neon"
#else
#define KV_ISA_NAME "scalar"
#endif

/* ============================================================================================= */
#if defined(KV_ISA_AVX512)

typedef __m512 vf;
typedef __m512i vi;
typedef __m512i vb;

static inline __mmask16 kv_first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set1(float x) { return _mm512_set1_ps(x); }
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vf_load_n(const float *p, int64_t n) { return _mm512_maskz_loadu_ps(kv_first(n), p); }
static inline void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline void vf_store_n(float *p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, kv_first(n), v); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vf_abs(vf a) { return _mm512_abs_ps(a); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
/* lanes below n from v, the others `fill` */
static inline vf vf_first_n(vf v, int64_t n, float fill) { return _mm512_mask_mov_ps(_mm512_set1_ps(fill), kv_first(n), v); }
static inline float vf_reduce_add(vf v) { return _mm512_reduce_add_ps(v); }
static inline __m256 kv_fold8(vf v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
static inline float vf_reduce_max(vf v) { return _mm512_reduce_max_ps(v); }
static inline vf vf_round(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p * 2^i for integral i (the exponential's last step) */
static inline vf vf_scale2(vf p, vf i) { return _mm512_scalef_ps(p, i); }
static inline vf vf_load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf vf_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf vf_load_s8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }

static inline vi vi_zero(void) { return _mm512_setzero_si512(); }
static inline vi vi_load(const int32_t *p) { return _mm512_loadu_si512(p); }
static inline vi vi_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vi vi_set1(int32_t x) { return _mm512_set1_epi32(x); }
static inline int32_t vi_reduce_add(vi a) { return _mm512_reduce_add_epi32(a); }
static inline vi vf_to_vi(vf v) { return _mm512_cvtps_epi32(v); } /* nearest even */
static inline vf vi_to_vf(vi v) { return _mm512_cvtepi32_ps(v); }
/* the low byte of each lane, 16 bytes */
static inline void vi_store_bytes(void *p, vi v) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(v)); }

static inline vb vb_load(const void *p) { return _mm512_loadu_si512(p); }
static inline vb vb_bcast4(const void *p) { int32_t x; memcpy(&x, p, 4); return _mm512_set1_epi32(x); }
static inline vb vb_lo4(vb v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
static inline vb vb_hi4(vb v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
static inline vb vb_or(vb a, vb b) { return _mm512_or_si512(a, b); }
/* bytewise ((v >> shift) & (2^bits - 1)) << 4: high bits of a code put above its low nibble */
static inline vb vb_hibits(vb v, int shift, int bits) {
    const vb m = _mm512_set1_epi8((char)((1 << bits) - 1));
    return _mm512_slli_epi16(_mm512_and_si512(_mm512_srl_epi16(v, _mm_cvtsi32_si128(shift)), m), 4);
}
/* lane c += sum_r a[4c+r] * b[4c+r], a unsigned (0..127), b signed */
static inline vi vi_dot_u8s8(vi acc, vb a, vb b) { return _mm512_dpbusd_epi32(acc, a, b); }
/* lane c += sum_r (a[4c+r] - 128) * b[4c+r] with a unsigned and b signed: here VPDPBUSD gives
 * sum a*b, and the caller starts acc at -128 x the group sums of b (KV_DOT_Q8_NEEDS_CORR) */
#define KV_DOT_Q8_NEEDS_CORR 1
static inline vi vi_dot_q8(vi acc, vb a, vb b) { return _mm512_dpbusd_epi32(acc, a, b); }

/* ============================================================================================= */
#elif defined(KV_ISA_AVX2)

typedef struct { __m256 lo, hi; } vf;
typedef struct { __m256i lo, hi; } vi;
typedef struct { __m256i lo, hi; } vb;

static inline __m256i kv_mask8(int64_t n) { /* lanes below n all ones */
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 0 ? 0 : n > 8 ? 8 : n)), idx);
}
static inline vf vf_make(__m256 lo, __m256 hi) { vf r = {lo, hi}; return r; }
static inline vi vi_make(__m256i lo, __m256i hi) { vi r = {lo, hi}; return r; }
static inline vf vf_zero(void) { return vf_make(_mm256_setzero_ps(), _mm256_setzero_ps()); }
static inline vf vf_set1(float x) { return vf_make(_mm256_set1_ps(x), _mm256_set1_ps(x)); }
static inline vf vf_load(const float *p) { return vf_make(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
static inline vf vf_load_n(const float *p, int64_t n) {
    return vf_make(_mm256_maskload_ps(p, kv_mask8(n)), _mm256_maskload_ps(p + 8, kv_mask8(n - 8)));
}
static inline void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
static inline void vf_store_n(float *p, vf v, int64_t n) {
    _mm256_maskstore_ps(p, kv_mask8(n), v.lo);
    _mm256_maskstore_ps(p + 8, kv_mask8(n - 8), v.hi);
}
#define KV_F2(op) vf_make(op(a.lo, b.lo), op(a.hi, b.hi))
static inline vf vf_add(vf a, vf b) { return KV_F2(_mm256_add_ps); }
static inline vf vf_sub(vf a, vf b) { return KV_F2(_mm256_sub_ps); }
static inline vf vf_mul(vf a, vf b) { return KV_F2(_mm256_mul_ps); }
static inline vf vf_div(vf a, vf b) { return KV_F2(_mm256_div_ps); }
static inline vf vf_max(vf a, vf b) { return KV_F2(_mm256_max_ps); }
#undef KV_F2
static inline vf vf_abs(vf a) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return vf_make(_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m));
}
static inline vf vf_fmadd(vf a, vf b, vf c) { return vf_make(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)); }
static inline vf vf_first_n(vf v, int64_t n, float fill) {
    const __m256 f = _mm256_set1_ps(fill);
    return vf_make(_mm256_blendv_ps(f, v.lo, _mm256_castsi256_ps(kv_mask8(n))),
                   _mm256_blendv_ps(f, v.hi, _mm256_castsi256_ps(kv_mask8(n - 8))));
}
static inline float kv_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float kv_hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vf_reduce_add(vf v) { return kv_hsum8(_mm256_add_ps(v.lo, v.hi)); }
static inline __m256 kv_fold8(vf v) { return _mm256_add_ps(v.lo, v.hi); }
static inline float vf_reduce_max(vf v) { return kv_hmax8(_mm256_max_ps(v.lo, v.hi)); }
static inline vf vf_round(vf v) {
    return vf_make(_mm256_round_ps(v.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                   _mm256_round_ps(v.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline __m256 kv_scale2_8(__m256 p, __m256 i) { /* i >= -126 after the clamp: 2^i is a normal float */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(_mm256_max_ps(i, _mm256_set1_ps(-126.0f))),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline vf vf_scale2(vf p, vf i) { return vf_make(kv_scale2_8(p.lo, i.lo), kv_scale2_8(p.hi, i.hi)); }
static inline vf vf_load_bf16(const uint16_t *p) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)p);
    return vf_make(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(w)), 16)),
                   _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(w, 1)), 16)));
}
static inline vf vf_load_f16(const uint16_t *p) {
    return vf_make(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8))));
}
static inline vf vf_load_s8(const int8_t *p) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    return vf_make(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
}

static inline vi vi_zero(void) { return vi_make(_mm256_setzero_si256(), _mm256_setzero_si256()); }
static inline vi vi_load(const int32_t *p) {
    return vi_make(_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(p + 8)));
}
static inline vi vi_add(vi a, vi b) { return vi_make(_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)); }
static inline vi vi_set1(int32_t x) { return vi_make(_mm256_set1_epi32(x), _mm256_set1_epi32(x)); }
static inline int32_t vi_reduce_add(vi a) {
    __m256i s = _mm256_add_epi32(a.lo, a.hi);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    return _mm_cvtsi128_si32(t);
}
static inline vi vf_to_vi(vf v) { return vi_make(_mm256_cvtps_epi32(v.lo), _mm256_cvtps_epi32(v.hi)); }
static inline vf vi_to_vf(vi v) { return vf_make(_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)); }
static inline void vi_store_bytes(void *p, vi v) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i a = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v.lo, pick), perm); /* bytes 0..7 low */
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v.hi, pick), perm);
    _mm_storel_epi64((__m128i *)p, _mm256_castsi256_si128(a));
    _mm_storel_epi64((__m128i *)((uint8_t *)p + 8), _mm256_castsi256_si128(b));
}

static inline vb vb_load(const void *p) {
    return (vb){_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)((const uint8_t *)p + 32))};
}
static inline vb vb_bcast4(const void *p) { int32_t x; memcpy(&x, p, 4); return (vb){_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
static inline vb vb_lo4(vb v) { const __m256i m = _mm256_set1_epi8(0x0F); return (vb){_mm256_and_si256(v.lo, m), _mm256_and_si256(v.hi, m)}; }
static inline vb vb_hi4(vb v) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    return (vb){_mm256_and_si256(_mm256_srli_epi16(v.lo, 4), m), _mm256_and_si256(_mm256_srli_epi16(v.hi, 4), m)};
}
static inline vb vb_or(vb a, vb b) { return (vb){_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
static inline __m256i kv_hibits8(__m256i v, __m128i shift, __m256i m) {
    return _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(v, shift), m), 4);
}
/* bytewise ((v >> shift) & (2^bits - 1)) << 4: high bits of a code put above its low nibble */
static inline vb vb_hibits(vb v, int shift, int bits) {
    const __m256i m = _mm256_set1_epi8((char)((1 << bits) - 1));
    const __m128i sh = _mm_cvtsi32_si128(shift);
    return (vb){kv_hibits8(v.lo, sh, m), kv_hibits8(v.hi, sh, m)};
}
/* a in 0..127: the pairwise int16 sums of VPMADDUBSW cannot saturate, so the result is exact */
static inline __m256i kv_dot8_u8s8(__m256i acc, __m256i a, __m256i b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}
static inline vi vi_dot_u8s8(vi acc, vb a, vb b) { return vi_make(kv_dot8_u8s8(acc.lo, a.lo, b.lo), kv_dot8_u8s8(acc.hi, a.hi, b.hi)); }
#if defined(__AVXVNNI__)
/* one VPDPBUSD per 32 bytes: the int4 and int8 GEMMs take the AVX-512 path's arithmetic */
#define KV_DOT_Q8_NEEDS_CORR 1
static inline vi vi_dot_q8(vi acc, vb a, vb b) {
    return vi_make(_mm256_dpbusd_avx_epi32(acc.lo, a.lo, b.lo), _mm256_dpbusd_avx_epi32(acc.hi, a.hi, b.hi));
}
#define vi_dot_u8s8 vi_dot_q8 /* a in 0..127: the same unsigned x signed product */
#else
/* The same dot products kept in 32 int16 lanes (pairs of products) until widened once: one
 * instruction a step instead of three. Exact while every lane's sum stays below 2^15, e.g. up to 8
 * steps of 4-bit codes (8 x 2 x 15 x 127 = 30480): the int4 GEMM's group. */
#define KV_DOT16 1
typedef struct { __m256i lo, hi; } vs;
static inline vs vs_zero(void) { return (vs){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline vs vs_dot_u8s8(vs acc, vb a, vb b) {
    return (vs){_mm256_add_epi16(acc.lo, _mm256_maddubs_epi16(a.lo, b.lo)),
                _mm256_add_epi16(acc.hi, _mm256_maddubs_epi16(a.hi, b.hi))};
}
static inline vi vs_widen(vs s) {
    const __m256i one = _mm256_set1_epi16(1);
    return vi_make(_mm256_madd_epi16(s.lo, one), _mm256_madd_epi16(s.hi, one));
}
/* (a - 128) is a signed byte s; s * b = |s| * (b with the sign of s), |s| <= 127: exact again */
#define KV_DOT_Q8_NEEDS_CORR 0
/* with |a - 128| (ua) and a - 128 (sa) made beforehand: b takes the sign of sa */
static inline __m256i kv_dot8_q8s(__m256i acc, __m256i ua, __m256i sa, __m256i b) {
    return kv_dot8_u8s8(acc, ua, _mm256_sign_epi8(b, sa));
}
static inline __m256i kv_dot8_q8(__m256i acc, __m256i a, __m256i b) {
    const __m256i s = _mm256_xor_si256(a, _mm256_set1_epi8((char)0x80));
    return kv_dot8_q8s(acc, _mm256_sign_epi8(s, s), s, b);
}
static inline vi vi_dot_q8(vi acc, vb a, vb b) { return vi_make(kv_dot8_q8(acc.lo, a.lo, b.lo), kv_dot8_q8(acc.hi, a.hi, b.hi)); }
static inline vi vi_dot_q8s(vi acc, vb ua, vb sa, vb b) {
    return vi_make(kv_dot8_q8s(acc.lo, ua.lo, sa.lo, b.lo), kv_dot8_q8s(acc.hi, ua.hi, sa.hi, b.hi));
}
#endif

/* ============================================================================================= */
#elif defined(KV_ISA_NEON)

typedef struct { float32x4_t v[4]; } vf;
typedef struct { int32x4_t v[4]; } vi;
typedef struct { uint8x16_t v[4]; } vb;

static inline uint32x4_t kv_mask4(int64_t n) {
    const int32_t idx[4] = {0, 1, 2, 3};
    return vcltq_s32(vld1q_s32(idx), vdupq_n_s32((int32_t)(n < 0 ? 0 : n > 4 ? 4 : n)));
}
#define KV_FOR4 for (int k_ = 0; k_ < 4; k_++)
static inline vf vf_zero(void) { vf r; KV_FOR4 r.v[k_] = vdupq_n_f32(0.0f); return r; }
static inline vf vf_set1(float x) { vf r; KV_FOR4 r.v[k_] = vdupq_n_f32(x); return r; }
static inline vf vf_load(const float *p) { vf r; KV_FOR4 r.v[k_] = vld1q_f32(p + 4 * k_); return r; }
static inline vf vf_load_n(const float *p, int64_t n) {
    if (n >= 16) return vf_load(p);
    float t[16] = {0};
    memcpy(t, p, sizeof(float) * (size_t)(n > 0 ? n : 0));
    return vf_load(t);
}
static inline void vf_store(float *p, vf v) { KV_FOR4 vst1q_f32(p + 4 * k_, v.v[k_]); }
static inline void vf_store_n(float *p, vf v, int64_t n) {
    if (n >= 16) { vf_store(p, v); return; }
    float t[16];
    vf_store(t, v);
    memcpy(p, t, sizeof(float) * (size_t)(n > 0 ? n : 0));
}
static inline vf vf_add(vf a, vf b) { KV_FOR4 a.v[k_] = vaddq_f32(a.v[k_], b.v[k_]); return a; }
static inline vf vf_sub(vf a, vf b) { KV_FOR4 a.v[k_] = vsubq_f32(a.v[k_], b.v[k_]); return a; }
static inline vf vf_mul(vf a, vf b) { KV_FOR4 a.v[k_] = vmulq_f32(a.v[k_], b.v[k_]); return a; }
static inline vf vf_div(vf a, vf b) { KV_FOR4 a.v[k_] = vdivq_f32(a.v[k_], b.v[k_]); return a; }
static inline vf vf_max(vf a, vf b) { KV_FOR4 a.v[k_] = vmaxq_f32(a.v[k_], b.v[k_]); return a; }
static inline vf vf_abs(vf a) { KV_FOR4 a.v[k_] = vabsq_f32(a.v[k_]); return a; }
static inline vf vf_fmadd(vf a, vf b, vf c) { KV_FOR4 c.v[k_] = vfmaq_f32(c.v[k_], a.v[k_], b.v[k_]); return c; }
static inline vf vf_first_n(vf v, int64_t n, float fill) {
    KV_FOR4 v.v[k_] = vbslq_f32(kv_mask4(n - 4 * k_), v.v[k_], vdupq_n_f32(fill));
    return v;
}
static inline float vf_reduce_add(vf v) { return vaddvq_f32(vaddq_f32(vaddq_f32(v.v[0], v.v[1]), vaddq_f32(v.v[2], v.v[3]))); }
static inline float vf_reduce_max(vf v) { return vmaxvq_f32(vmaxq_f32(vmaxq_f32(v.v[0], v.v[1]), vmaxq_f32(v.v[2], v.v[3]))); }
static inline vf vf_round(vf v) { KV_FOR4 v.v[k_] = vrndnq_f32(v.v[k_]); return v; }
static inline vf vf_scale2(vf p, vf i) {
    KV_FOR4 {
        const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(vmaxq_f32(i.v[k_], vdupq_n_f32(-126.0f))), vdupq_n_s32(127)), 23);
        p.v[k_] = vmulq_f32(p.v[k_], vreinterpretq_f32_s32(e));
    }
    return p;
}
static inline vf vf_load_bf16(const uint16_t *p) {
    vf r;
    KV_FOR4 r.v[k_] = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p + 4 * k_), 16));
    return r;
}
static inline vf vf_load_f16(const uint16_t *p) {
    vf r;
    KV_FOR4 r.v[k_] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * k_)));
    return r;
}
static inline vf vf_load_s8(const int8_t *p) {
    const int8x16_t b = vld1q_s8(p);
    const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_s8(vget_high_s8(b));
    vf r;
    r.v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    r.v[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
    r.v[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    r.v[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
    return r;
}

static inline vi vi_zero(void) { vi r; KV_FOR4 r.v[k_] = vdupq_n_s32(0); return r; }
static inline vi vi_load(const int32_t *p) { vi r; KV_FOR4 r.v[k_] = vld1q_s32(p + 4 * k_); return r; }
static inline vi vi_add(vi a, vi b) { KV_FOR4 a.v[k_] = vaddq_s32(a.v[k_], b.v[k_]); return a; }
static inline vi vi_set1(int32_t x) { vi r; KV_FOR4 r.v[k_] = vdupq_n_s32(x); return r; }
static inline int32_t vi_reduce_add(vi a) { return vaddvq_s32(vaddq_s32(vaddq_s32(a.v[0], a.v[1]), vaddq_s32(a.v[2], a.v[3]))); }
static inline vi vf_to_vi(vf v) { vi r; KV_FOR4 r.v[k_] = vcvtnq_s32_f32(v.v[k_]); return r; }
static inline vf vi_to_vf(vi v) { vf r; KV_FOR4 r.v[k_] = vcvtq_f32_s32(v.v[k_]); return r; }
static inline void vi_store_bytes(void *p, vi v) {
    const int16x8_t lo = vcombine_s16(vmovn_s32(v.v[0]), vmovn_s32(v.v[1]));
    const int16x8_t hi = vcombine_s16(vmovn_s32(v.v[2]), vmovn_s32(v.v[3]));
    vst1q_s8((int8_t *)p, vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
}

static inline vb vb_load(const void *p) { vb r; KV_FOR4 r.v[k_] = vld1q_u8((const uint8_t *)p + 16 * k_); return r; }
static inline vb vb_bcast4(const void *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    vb r;
    KV_FOR4 r.v[k_] = vreinterpretq_u8_u32(vdupq_n_u32(x));
    return r;
}
static inline vb vb_lo4(vb v) { KV_FOR4 v.v[k_] = vandq_u8(v.v[k_], vdupq_n_u8(0x0F)); return v; }
static inline vb vb_hi4(vb v) { KV_FOR4 v.v[k_] = vshrq_n_u8(v.v[k_], 4); return v; }
static inline vb vb_or(vb a, vb b) { KV_FOR4 a.v[k_] = vorrq_u8(a.v[k_], b.v[k_]); return a; }
/* bytewise ((v >> shift) & (2^bits - 1)) << 4: high bits of a code put above its low nibble */
static inline vb vb_hibits(vb v, int shift, int bits) {
    const int8x16_t sh = vdupq_n_s8((int8_t)-shift);
    const uint8x16_t m = vdupq_n_u8((uint8_t)((1 << bits) - 1));
    KV_FOR4 v.v[k_] = vshlq_n_u8(vandq_u8(vshlq_u8(v.v[k_], sh), m), 4);
    return v;
}
static inline int32x4_t kv_dot4_s8(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    const int16x8_t hi = vmull_s8(vget_high_s8(a), vget_high_s8(b));
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}
/* a in 0..127 reads the same as a signed byte */
static inline vi vi_dot_u8s8(vi acc, vb a, vb b) {
    KV_FOR4 acc.v[k_] = kv_dot4_s8(acc.v[k_], vreinterpretq_s8_u8(a.v[k_]), vreinterpretq_s8_u8(b.v[k_]));
    return acc;
}
#define KV_DOT_Q8_NEEDS_CORR 0
static inline vi vi_dot_q8(vi acc, vb a, vb b) {
    KV_FOR4 acc.v[k_] = kv_dot4_s8(acc.v[k_], vreinterpretq_s8_u8(veorq_u8(a.v[k_], vdupq_n_u8(0x80))),
                                   vreinterpretq_s8_u8(b.v[k_]));
    return acc;
}
#undef KV_FOR4

/* ============================================================================================= */
#else /* portable scalar C */

typedef struct { float v[16]; } vf;
typedef struct { int32_t v[16]; } vi;
typedef struct { uint8_t v[64]; } vb;

#define KV_FOR16 for (int l_ = 0; l_ < 16; l_++)
static inline vf vf_zero(void) { vf r; KV_FOR16 r.v[l_] = 0.0f; return r; }
static inline vf vf_set1(float x) { vf r; KV_FOR16 r.v[l_] = x; return r; }
static inline vf vf_load(const float *p) { vf r; memcpy(r.v, p, sizeof r.v); return r; }
static inline vf vf_load_n(const float *p, int64_t n) { vf r; KV_FOR16 r.v[l_] = l_ < n ? p[l_] : 0.0f; return r; }
static inline void vf_store(float *p, vf v) { memcpy(p, v.v, sizeof v.v); }
static inline void vf_store_n(float *p, vf v, int64_t n) { KV_FOR16 if (l_ < n) p[l_] = v.v[l_]; }
static inline vf vf_add(vf a, vf b) { KV_FOR16 a.v[l_] += b.v[l_]; return a; }
static inline vf vf_sub(vf a, vf b) { KV_FOR16 a.v[l_] -= b.v[l_]; return a; }
static inline vf vf_mul(vf a, vf b) { KV_FOR16 a.v[l_] *= b.v[l_]; return a; }
static inline vf vf_div(vf a, vf b) { KV_FOR16 a.v[l_] /= b.v[l_]; return a; }
static inline vf vf_max(vf a, vf b) { KV_FOR16 a.v[l_] = a.v[l_] > b.v[l_] ? a.v[l_] : b.v[l_]; return a; }
static inline vf vf_abs(vf a) { KV_FOR16 a.v[l_] = fabsf(a.v[l_]); return a; }
static inline vf vf_fmadd(vf a, vf b, vf c) { KV_FOR16 c.v[l_] = fmaf(a.v[l_], b.v[l_], c.v[l_]); return c; }
static inline vf vf_first_n(vf v, int64_t n, float fill) { KV_FOR16 if (l_ >= n) v.v[l_] = fill; return v; }
static inline float vf_reduce_add(vf v) { float s = 0.0f; KV_FOR16 s += v.v[l_]; return s; }
static inline float vf_reduce_max(vf v) { float m = v.v[0]; KV_FOR16 m = v.v[l_] > m ? v.v[l_] : m; return m; }
static inline vf vf_round(vf v) { KV_FOR16 v.v[l_] = nearbyintf(v.v[l_]); return v; }
static inline vf vf_scale2(vf p, vf i) { KV_FOR16 p.v[l_] = ldexpf(p.v[l_], (int)i.v[l_]); return p; }
static inline vf vf_load_bf16(const uint16_t *p) {
    vf r;
    KV_FOR16 { uint32_t u = (uint32_t)p[l_] << 16; memcpy(&r.v[l_], &u, 4); }
    return r;
}
static inline float kv_half_to_float(uint16_t h) {
    const uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    float f;
    if (e == 0) f = ldexpf((float)m, -24); /* zero and subnormals */
    else if (e == 31) { uint32_t u = s | 0x7f800000u | (m << 13); memcpy(&f, &u, 4); return f; }
    else { uint32_t u = s | ((e + 112) << 23) | (m << 13); memcpy(&f, &u, 4); return f; }
    return s ? -f : f;
}
static inline vf vf_load_f16(const uint16_t *p) { vf r; KV_FOR16 r.v[l_] = kv_half_to_float(p[l_]); return r; }
static inline vf vf_load_s8(const int8_t *p) { vf r; KV_FOR16 r.v[l_] = (float)p[l_]; return r; }

static inline vi vi_zero(void) { vi r; KV_FOR16 r.v[l_] = 0; return r; }
static inline vi vi_load(const int32_t *p) { vi r; memcpy(r.v, p, sizeof r.v); return r; }
static inline vi vi_add(vi a, vi b) { KV_FOR16 a.v[l_] += b.v[l_]; return a; }
static inline vi vi_set1(int32_t x) { vi r; KV_FOR16 r.v[l_] = x; return r; }
static inline int32_t vi_reduce_add(vi a) { int32_t s = 0; KV_FOR16 s += a.v[l_]; return s; }
static inline vi vf_to_vi(vf v) { vi r; KV_FOR16 r.v[l_] = (int32_t)nearbyintf(v.v[l_]); return r; }
static inline vf vi_to_vf(vi v) { vf r; KV_FOR16 r.v[l_] = (float)v.v[l_]; return r; }
static inline void vi_store_bytes(void *p, vi v) { KV_FOR16 ((uint8_t *)p)[l_] = (uint8_t)(v.v[l_] & 0xFF); }

static inline vb vb_load(const void *p) { vb r; memcpy(r.v, p, 64); return r; }
static inline vb vb_bcast4(const void *p) { vb r; for (int k = 0; k < 64; k++) r.v[k] = ((const uint8_t *)p)[k % 4]; return r; }
static inline vb vb_lo4(vb v) { for (int k = 0; k < 64; k++) v.v[k] &= 0x0F; return v; }
static inline vb vb_hi4(vb v) { for (int k = 0; k < 64; k++) v.v[k] >>= 4; return v; }
static inline vb vb_or(vb a, vb b) { for (int k = 0; k < 64; k++) a.v[k] |= b.v[k]; return a; }
/* bytewise ((v >> shift) & (2^bits - 1)) << 4: high bits of a code put above its low nibble */
static inline vb vb_hibits(vb v, int shift, int bits) {
    for (int k = 0; k < 64; k++) v.v[k] = (uint8_t)(((v.v[k] >> shift) & ((1 << bits) - 1)) << 4);
    return v;
}
static inline vi vi_dot_u8s8(vi acc, vb a, vb b) {
    KV_FOR16 for (int r = 0; r < 4; r++) acc.v[l_] += (int32_t)a.v[4 * l_ + r] * (int32_t)(int8_t)b.v[4 * l_ + r];
    return acc;
}
#define KV_DOT_Q8_NEEDS_CORR 0
static inline vi vi_dot_q8(vi acc, vb a, vb b) {
    KV_FOR16 for (int r = 0; r < 4; r++) acc.v[l_] += ((int32_t)a.v[4 * l_ + r] - 128) * (int32_t)(int8_t)b.v[4 * l_ + r];
    return acc;
}
#undef KV_FOR16
#endif

#ifndef KV_DOT16
#define KV_DOT16 0 /* the ISA has no cheaper narrow accumulation than vi_dot_u8s8 */
#endif

/* ---- built on the layer above, the same on every ISA ---------------------------------------- */

/* the horizontal sums of four vectors at once (x86: three VHADDPS instead of four reductions), by one
 * tree on every ISA, so a sum has the same bits everywhere: with s_l = v_l + v_(l+8),
 * sum = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)) */
static inline void vf_reduce_add4(vf a, vf b, vf c, vf d, float *out) {
#if defined(KV_ISA_AVX512) || defined(KV_ISA_AVX2)
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(kv_fold8(a), kv_fold8(b)), _mm256_hadd_ps(kv_fold8(c), kv_fold8(d)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#elif defined(KV_ISA_NEON)
    const float32x4_t lo = vpaddq_f32(vpaddq_f32(vaddq_f32(a.v[0], a.v[2]), vaddq_f32(b.v[0], b.v[2])),
                                      vpaddq_f32(vaddq_f32(c.v[0], c.v[2]), vaddq_f32(d.v[0], d.v[2])));
    const float32x4_t hi = vpaddq_f32(vpaddq_f32(vaddq_f32(a.v[1], a.v[3]), vaddq_f32(b.v[1], b.v[3])),
                                      vpaddq_f32(vaddq_f32(c.v[1], c.v[3]), vaddq_f32(d.v[1], d.v[3])));
    vst1q_f32(out, vaddq_f32(lo, hi));
#else
    const vf *v[4] = {&a, &b, &c, &d};
    for (int i = 0; i < 4; i++) {
        float s[8];
        for (int l = 0; l < 8; l++) s[l] = v[i]->v[l] + v[i]->v[l + 8];
        out[i] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
#endif
}

/* exp(x) for softmax arguments (x <= 0): 2^(x log2 e) = 2^i * 2^f with i the nearest integer and
 * |f| <= 1/2, 2^f by its Taylor series to degree 7 (relative error below 1e-8). */
static inline vf vf_exp(vf x) {
    x = vf_max(x, vf_set1(-88.0f));
    const vf t = vf_mul(x, vf_set1(1.44269504088896341f));
    const vf i = vf_round(t);
    const vf f = vf_mul(vf_sub(t, i), vf_set1(0.693147180559945309f));
    vf p = vf_set1(1.0f / 5040.0f);
    p = vf_fmadd(p, f, vf_set1(1.0f / 720.0f));
    p = vf_fmadd(p, f, vf_set1(1.0f / 120.0f));
    p = vf_fmadd(p, f, vf_set1(1.0f / 24.0f));
    p = vf_fmadd(p, f, vf_set1(1.0f / 6.0f));
    p = vf_fmadd(p, f, vf_set1(0.5f));
    p = vf_fmadd(p, f, vf_set1(1.0f));
    p = vf_fmadd(p, f, vf_set1(1.0f));
    return vf_scale2(p, i);
}

/* 16 cache elements from index idx as float: dtype 0 float32, 1 bfloat16, 2 int8 (unscaled), 3 float16 */
static inline vf vf_load_cache(const void *base, int64_t idx, int dtype) {
    if (dtype == 0) return vf_load((const float *)base + idx);
    if (dtype == 1) return vf_load_bf16((const uint16_t *)base + idx);
    if (dtype == 3) return vf_load_f16((const uint16_t *)base + idx);
    return vf_load_s8((const int8_t *)base + idx);
}

/* bytes per cache element of each dtype code */
static inline int64_t kv_cache_esize(int dtype) { return dtype == 0 ? 4 : dtype == 2 ? 1 : 2; }

#endif
