/* gptcli's own products for decoding (a few rows), compiled on the user's machine at first use
   by gptcli/native.py (-O3 -march=native, OpenMP when the compiler has it).

   y (M, N) = x (M, K) . W^T + bias, W stored (N, K) row by row: each thread takes a run of
   output rows and reads their weights once, in memory order, for all M rows of x together.

   A row's dot product runs on four independent vector sums: one sum would wait on its own
   previous addition at every step (4-5 cycles), which made a 768-wide row cost more than
   reading its weights. AVX-512 and AVX2 get vector code here; other CPUs (NEON, ...) run the
   plain loops, which the compiler vectorizes as it can. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 1024 /* an int32 sum of 1024 products of |127| x |16383| cannot overflow */
#define XMAX 16383.f

#ifdef _OPENMP
#define PARALLEL_ROWS _Pragma("omp parallel for schedule(static) num_threads(threads)")
#else
#define PARALLEL_ROWS
#endif

/* ---------------------------------------------------------------- vectors, where we have them */

#if defined(__AVX512BW__)
typedef __m512i ivec; /* 32 int16 lanes in, 16 int32 sums */
#define ILANES 32
#define IZERO() _mm512_setzero_si512()
#define IWIDE(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define ILOAD(p) _mm512_loadu_si512((const void *)(p))
#define IADD(a, b) _mm512_add_epi32(a, b)
#define ISUM(s) _mm512_reduce_add_epi32(s)
#if defined(__AVX512VNNI__)
#define IMADD(s, w, a) _mm512_dpwssd_epi32(s, w, a)
#else
#define IMADD(s, w, a) _mm512_add_epi32(s, _mm512_madd_epi16(w, a))
#endif
#elif defined(__AVX2__)
typedef __m256i ivec;
#define ILANES 16
#define IZERO() _mm256_setzero_si256()
#define IWIDE(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define ILOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define IADD(a, b) _mm256_add_epi32(a, b)
#define IMADD(s, w, a) _mm256_add_epi32(s, _mm256_madd_epi16(w, a))
static inline int32_t isum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}
#define ISUM(s) isum(s)
#endif

#if defined(__AVX2__) /* (also used by int4's AVX2 code on AVX-512 CPUs without AVX512BW) */
static inline float fsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__)
typedef __m512 fvec;
#define FLANES 16
#define FZERO() _mm512_setzero_ps()
#define FLOAD_f32(p) _mm512_loadu_ps(p)
#define FLOAD_bf16(p) _mm512_castsi512_ps(_mm512_slli_epi32(                                   \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define FFMA(s, w, a) _mm512_fmadd_ps(w, a, s)
#define FADD(a, b) _mm512_add_ps(a, b)
#define FSUM(s) _mm512_reduce_add_ps(s)
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 fvec;
#define FLANES 8
#define FZERO() _mm256_setzero_ps()
#define FLOAD_f32(p) _mm256_loadu_ps(p)
#define FLOAD_bf16(p) _mm256_castsi256_ps(_mm256_slli_epi32(                                   \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define FFMA(s, w, a) _mm256_fmadd_ps(w, a, s)
#define FADD(a, b) _mm256_add_ps(a, b)
#define FSUM(s) fsum(s)
#endif

/* Each thread reads its run of weight rows front to back, and each row asks for the one LEAD
   bytes per input ahead (4 rows of int8, 2 of bf16, 1 of float32, 8 of int4): on a 2-core Xeon
   VM the hardware prefetcher alone left memory idle between rows (int8 blocks 2.7 ms a token
   with this, 3.4 without; bf16 7.1 against 8.2; float32 alike either way). */
#define LEAD 4
static inline void prefetch(const void *p, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch((const char *)p + c, 0, 3);
}

/* ---------------------------------------------------------------- int8 weights */

/* x's rows rounded to 15-bit integers, each with its own step (max |x| / 16383); a row holding
   a NaN gets a NaN step, so its results are NaN as torch's would be (an infinity: inf * 0) */
static void round_rows(const float *x, int64_t M, int64_t K, int16_t *xq, float *step) {
  for (int64_t m = 0; m < M; m++) {
    const float *r = x + m * K;
    float amax = 0.f;
    int nan = 0;
    for (int64_t k = 0; k < K; k++) { amax = fmaxf(amax, fabsf(r[k])); nan |= r[k] != r[k]; }
    step[m] = nan ? NAN : amax > 0.f ? amax / XMAX : 1.f;
    float inv = 1.f / step[m];
    for (int64_t k = 0; k < K; k++) xq[m * K + k] = (int16_t)lrintf(r[k] * inv);
  }
}

/* w . a over [k0, k1), at most BLOCK long: exact in int32 */
static inline int32_t dot1_int8(const int8_t *w, const int16_t *a, int64_t k0, int64_t k1) {
  int64_t k = k0;
  int32_t sum = 0;
#ifdef ILANES
  ivec s0 = IZERO(), s1 = IZERO(), s2 = IZERO(), s3 = IZERO();
  for (; k + 4 * ILANES <= k1; k += 4 * ILANES) {
    s0 = IMADD(s0, IWIDE(w + k), ILOAD(a + k));
    s1 = IMADD(s1, IWIDE(w + k + ILANES), ILOAD(a + k + ILANES));
    s2 = IMADD(s2, IWIDE(w + k + 2 * ILANES), ILOAD(a + k + 2 * ILANES));
    s3 = IMADD(s3, IWIDE(w + k + 3 * ILANES), ILOAD(a + k + 3 * ILANES));
  }
  for (; k + ILANES <= k1; k += ILANES) s0 = IMADD(s0, IWIDE(w + k), ILOAD(a + k));
  sum = ISUM(IADD(IADD(s0, s1), IADD(s2, s3)));
#endif
  for (; k < k1; k++) sum += (int32_t)w[k] * a[k];
  return sum;
}

/* sums[i] += w . a_i over [k0, k1) for four rows a_i (K apart) */
static inline void dot4_int8(const int8_t *w, const int16_t *a, int64_t K, int64_t k0,
                             int64_t k1, int64_t sums[4]) {
  const int16_t *a0 = a, *a1 = a + K, *a2 = a + 2 * K, *a3 = a + 3 * K;
  int64_t k = k0;
  int32_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
#ifdef ILANES
  ivec s0 = IZERO(), s1 = IZERO(), s2 = IZERO(), s3 = IZERO();
  for (; k + ILANES <= k1; k += ILANES) {
    ivec v = IWIDE(w + k);
    s0 = IMADD(s0, v, ILOAD(a0 + k)); s1 = IMADD(s1, v, ILOAD(a1 + k));
    s2 = IMADD(s2, v, ILOAD(a2 + k)); s3 = IMADD(s3, v, ILOAD(a3 + k));
  }
  t0 = ISUM(s0); t1 = ISUM(s1); t2 = ISUM(s2); t3 = ISUM(s3);
#endif
  for (; k < k1; k++) {
    int32_t v = w[k];
    t0 += v * a0[k]; t1 += v * a1[k]; t2 += v * a2[k]; t3 += v * a3[k];
  }
  sums[0] += t0; sums[1] += t1; sums[2] += t2; sums[3] += t3;
}

/* int8 weights q (N, K) with one scale per output row; activations rounded to 15 bits per row
   (relative error ~1e-4, well under the weights'). Returns 0, or -1 if out of memory. */
int gptcli_int8(const float *x, int64_t M, int64_t K, const int8_t *q, const float *scale,
                const float *bias, float *y, int64_t N, int threads) {
  int16_t *xq = malloc(sizeof(int16_t) * M * K);
  float *step = malloc(sizeof(float) * M);
  if (!xq || !step) { free(xq); free(step); return -1; }
  round_rows(x, M, K, xq, step);
  PARALLEL_ROWS
  for (int64_t n = 0; n < N; n++) {
    const int8_t *w = q + n * K;
    if (n + LEAD < N) prefetch(w + LEAD * K, K);
    float b = bias ? bias[n] : 0.f;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      int64_t sums[4] = {0, 0, 0, 0};
      for (int64_t k0 = 0; k0 < K; k0 += BLOCK)
        dot4_int8(w, xq + m * K, K, k0, k0 + BLOCK < K ? k0 + BLOCK : K, sums);
      for (int i = 0; i < 4; i++) y[(m + i) * N + n] = (float)sums[i] * step[m + i] * scale[n] + b;
    }
    for (; m < M; m++) {
      int64_t sum = 0;
      for (int64_t k0 = 0; k0 < K; k0 += BLOCK)
        sum += dot1_int8(w, xq + m * K, k0, k0 + BLOCK < K ? k0 + BLOCK : K);
      y[m * N + n] = (float)sum * step[m] * scale[n] + b;
    }
  }
  free(xq); free(step);
  return 0;
}

/* ---------------------------------------------------------------- int4 weights */

/* w[n, k] = q * scale[n, g] + low[n, g] for k in group g (32 inputs), q in [0, 15]: two per
   byte, byte j of a group holding its element j (low nibble) and element j + 16 (high). With
   activations a rounded as for int8: w . a = sum_g scale_g (q_g . a_g) + sum_g low_g sum(a_g),
   the first summed in vectors of one group's partial sums scaled, the second from the groups'
   sums of a (the same for every output row). */
#define GROUP 32

#if defined(__AVX512BW__)
static inline ivec nibbles(const uint8_t *p) { /* a group's 32 weights as int16 */
  __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  return _mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo));
}
#define GDOT(q, a) IMADD(IZERO(), q, ILOAD(a))
#define GCVT(d) _mm512_cvtepi32_ps(d)
#define GFMA(acc, v, s) _mm512_fmadd_ps(v, _mm512_set1_ps(s), acc)
#define GZERO() _mm512_setzero_ps()
#define GSUM(v) _mm512_reduce_add_ps(v)
typedef __m512 gvec;
#define GVEC 1
#elif defined(__AVX2__) && defined(__FMA__)
typedef struct { __m256i lo, hi; } i4pair;
static inline i4pair nibbles(const uint8_t *p) {
  __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0F);
  i4pair q = {_mm256_cvtepu8_epi16(_mm_and_si128(b, m)),
              _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), m))};
  return q;
}
#define GDOT(q, a) _mm256_add_epi32(_mm256_madd_epi16((q).lo, ILOAD(a)),                         \
                                    _mm256_madd_epi16((q).hi, ILOAD((a) + 16)))
#define GCVT(d) _mm256_cvtepi32_ps(d)
#define GFMA(acc, v, s) _mm256_fmadd_ps(v, _mm256_set1_ps(s), acc)
#define GZERO() _mm256_setzero_ps()
#define GSUM(v) fsum(v)
typedef __m256 gvec;
#define GVEC 1
#endif

static inline float group_dot(const uint8_t *p, const int16_t *a) {
  int32_t s = 0;
  for (int j = 0; j < GROUP / 2; j++) s += (p[j] & 15) * a[j] + (p[j] >> 4) * a[j + GROUP / 2];
  return (float)s;
}

/* sum_g low_g * sums_g, in four sums (one would wait on itself at every step) */
static inline float low_term(const float *low, const float *sums, int64_t G) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) {
    s0 += low[g] * sums[g]; s1 += low[g + 1] * sums[g + 1];
    s2 += low[g + 2] * sums[g + 2]; s3 += low[g + 3] * sums[g + 3];
  }
  for (; g < G; g++) s0 += low[g] * sums[g];
  return (s0 + s1) + (s2 + s3);
}

/* out[i] = sum_g scale_g (q_g . a_i,g) for R (1 or 4) rows a_i of xq (K apart) */
static inline void int4_dots(const uint8_t *p, const float *scale, const int16_t *a, int64_t K,
                             int R, float *out) {
  int64_t G = K / GROUP;
#ifdef GVEC
  if (R == 4) {
    gvec s0 = GZERO(), s1 = GZERO(), s2 = GZERO(), s3 = GZERO();
    for (int64_t g = 0; g < G; g++) {
      const int16_t *ag = a + g * GROUP;
      float sc = scale[g];
      __typeof__(nibbles(p)) q = nibbles(p + g * GROUP / 2);
      s0 = GFMA(s0, GCVT(GDOT(q, ag)), sc);
      s1 = GFMA(s1, GCVT(GDOT(q, ag + K)), sc);
      s2 = GFMA(s2, GCVT(GDOT(q, ag + 2 * K)), sc);
      s3 = GFMA(s3, GCVT(GDOT(q, ag + 3 * K)), sc);
    }
    out[0] = GSUM(s0); out[1] = GSUM(s1); out[2] = GSUM(s2); out[3] = GSUM(s3);
    return;
  }
  gvec s0 = GZERO(), s1 = GZERO();
  int64_t g = 0;
  for (; g + 2 <= G; g += 2) {
    s0 = GFMA(s0, GCVT(GDOT(nibbles(p + g * GROUP / 2), a + g * GROUP)), scale[g]);
    s1 = GFMA(s1, GCVT(GDOT(nibbles(p + (g + 1) * GROUP / 2), a + (g + 1) * GROUP)),
              scale[g + 1]);
  }
  if (g < G) s0 = GFMA(s0, GCVT(GDOT(nibbles(p + g * GROUP / 2), a + g * GROUP)), scale[g]);
  out[0] = GSUM(s0) + GSUM(s1);
#else
  for (int i = 0; i < R; i++) {
    float s = 0.f;
    for (int64_t g = 0; g < G; g++)
      s += scale[g] * group_dot(p + g * GROUP / 2, a + i * K + g * GROUP);
    out[i] = s;
  }
#endif
}

/* int4 weights p (N, K / 2) with scale, low (N, K / 32); K a multiple of 32; activations
   rounded to 15 bits per row. Returns 0, or -1 if out of memory. */
int gptcli_int4(const float *x, int64_t M, int64_t K, const uint8_t *p, const float *scale,
                const float *low, const float *bias, float *y, int64_t N, int threads) {
  int64_t G = K / GROUP;
  int16_t *xq = malloc(sizeof(int16_t) * M * K);
  float *step = malloc(sizeof(float) * M), *sums = malloc(sizeof(float) * M * G);
  if (!xq || !step || !sums) { free(xq); free(step); free(sums); return -1; }
  round_rows(x, M, K, xq, step);
  for (int64_t i = 0; i < M * G; i++) {
    int32_t s = 0;
    for (int j = 0; j < GROUP; j++) s += xq[i * GROUP + j];
    sums[i] = (float)s;
  }
  PARALLEL_ROWS
  for (int64_t n = 0; n < N; n++) {
    const uint8_t *r = p + n * (K / 2);
    const float *sc = scale + n * G, *lo = low + n * G;
    if (n + 2 * LEAD < N) {
      prefetch(r + 2 * LEAD * (K / 2), K / 2);
      prefetch(sc + 2 * LEAD * G, G * 4);
      prefetch(lo + 2 * LEAD * G, G * 4);
    }
    float b = bias ? bias[n] : 0.f, out[4];
    int64_t m = 0;
    for (; m < M; m += (M - m >= 4 ? 4 : 1)) {
      int R = M - m >= 4 ? 4 : 1;
      int4_dots(r, sc, xq + m * K, K, R, out);
      for (int i = 0; i < R; i++)
        y[(m + i) * N + n] = (out[i] + low_term(lo, sums + (m + i) * G, G)) * step[m + i] + b;
    }
  }
  free(xq); free(step); free(sums);
  return 0;
}

/* ---------------------------------------------------------------- float weights (f32, bf16) */

static inline float from_bf16(uint16_t h) {
  union { uint32_t u; float f; } v = {(uint32_t)h << 16};
  return v.f;
}

static inline float from_f32(float v) { return v; }

#ifdef FLANES
#define VECTOR_DOT1(T)                                                                      \
  fvec s0 = FZERO(), s1 = FZERO(), s2 = FZERO(), s3 = FZERO();                              \
  for (; k + 4 * FLANES <= K; k += 4 * FLANES) {                                            \
    s0 = FFMA(s0, FLOAD_##T(w + k), FLOAD_f32(a + k));                                      \
    s1 = FFMA(s1, FLOAD_##T(w + k + FLANES), FLOAD_f32(a + k + FLANES));                    \
    s2 = FFMA(s2, FLOAD_##T(w + k + 2 * FLANES), FLOAD_f32(a + k + 2 * FLANES));            \
    s3 = FFMA(s3, FLOAD_##T(w + k + 3 * FLANES), FLOAD_f32(a + k + 3 * FLANES));            \
  }                                                                                         \
  for (; k + FLANES <= K; k += FLANES) s0 = FFMA(s0, FLOAD_##T(w + k), FLOAD_f32(a + k));   \
  sum = FSUM(FADD(FADD(s0, s1), FADD(s2, s3)));
#define VECTOR_DOT4(T)                                                                      \
  fvec s0 = FZERO(), s1 = FZERO(), s2 = FZERO(), s3 = FZERO();                              \
  for (; k + FLANES <= K; k += FLANES) {                                                    \
    fvec v = FLOAD_##T(w + k);                                                              \
    s0 = FFMA(s0, v, FLOAD_f32(a0 + k)); s1 = FFMA(s1, v, FLOAD_f32(a1 + k));               \
    s2 = FFMA(s2, v, FLOAD_f32(a2 + k)); s3 = FFMA(s3, v, FLOAD_f32(a3 + k));               \
  }                                                                                         \
  t0 = FSUM(s0); t1 = FSUM(s1); t2 = FSUM(s2); t3 = FSUM(s3);
#else
#define VECTOR_DOT1(T)
#define VECTOR_DOT4(T)
#endif

/* float weights w (N, K) of type T (LOAD reads one as float), float32 activations and sums */
#define FLOAT_PRODUCT(NAME, T, TYPE, LOAD)                                                  \
  static inline float dot1_##T(const TYPE *w, const float *a, int64_t K) {                  \
    int64_t k = 0;                                                                          \
    float sum = 0.f;                                                                        \
    VECTOR_DOT1(T)                                                                          \
    for (; k < K; k++) sum += LOAD(w[k]) * a[k];                                            \
    return sum;                                                                             \
  }                                                                                         \
  static inline void dot4_##T(const TYPE *w, const float *a, int64_t K, float *y,           \
                              int64_t N, float b) {                                         \
    const float *a0 = a, *a1 = a + K, *a2 = a + 2 * K, *a3 = a + 3 * K;                     \
    int64_t k = 0;                                                                          \
    float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;                                           \
    VECTOR_DOT4(T)                                                                          \
    for (; k < K; k++) {                                                                    \
      float v = LOAD(w[k]);                                                                 \
      t0 += v * a0[k]; t1 += v * a1[k]; t2 += v * a2[k]; t3 += v * a3[k];                   \
    }                                                                                       \
    y[0] = t0 + b; y[N] = t1 + b; y[2 * N] = t2 + b; y[3 * N] = t3 + b;                     \
  }                                                                                         \
  int NAME(const float *x, int64_t M, int64_t K, const TYPE *w, const float *bias,         \
           float *y, int64_t N, int threads) {                                              \
    PARALLEL_ROWS                                                                           \
    for (int64_t n = 0; n < N; n++) {                                                       \
      const TYPE *r = w + n * K;                                                            \
      int64_t ahead = LEAD / (int64_t)sizeof(TYPE);                                         \
      if (n + ahead < N) prefetch(r + ahead * K, K * (int64_t)sizeof(TYPE));                \
      float b = bias ? bias[n] : 0.f;                                                       \
      int64_t m = 0;                                                                        \
      for (; m + 4 <= M; m += 4) dot4_##T(r, x + m * K, K, y + m * N + n, N, b);            \
      for (; m < M; m++) y[m * N + n] = dot1_##T(r, x + m * K, K) + b;                      \
    }                                                                                       \
    return 0;                                                                               \
  }

FLOAT_PRODUCT(gptcli_bf16, bf16, uint16_t, from_bf16)
FLOAT_PRODUCT(gptcli_f32, f32, float, from_f32)

/* ---------------------------------------------------------------- a whole block, one token */

/* A block's decode step for R rows at one position, in one call (native_step.py): layer
   norm, the qkv product, the new key and value written into the cache, attention over the
   cached positions, the output product and residual, layer norm, the MLP (GELU, tanh form)
   and residual. Every operation around the products is a loop over a few thousand floats,
   which costs less here than calling it from Python costs there. */

typedef struct {
  int kind; /* 0: float32 w (N, K); 1: bf16 w (N, K); 2: int8 w (N, K) and scale (N); 3: int4 */
  const void *w;
  const float *scale, *low, *bias;
  int64_t N, K;
} gptcli_linear;

typedef struct {
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
  float eps;
  gptcli_linear qkv, proj, fc, out;
} gptcli_block_weights;

static int linear(const gptcli_linear *l, const float *x, int64_t M, float *y, int threads) {
  switch (l->kind) {
  case 0: return gptcli_f32(x, M, l->K, l->w, l->bias, y, l->N, threads);
  case 1: return gptcli_bf16(x, M, l->K, l->w, l->bias, y, l->N, threads);
  case 2: return gptcli_int8(x, M, l->K, l->w, l->scale, l->bias, y, l->N, threads);
  case 3: return gptcli_int4(x, M, l->K, l->w, l->scale, l->low, l->bias, y, l->N, threads);
  }
  return -2;
}

/* e^x, from 2^n and a degree-6 polynomial on the rest (|r| <= ln 2 / 2): relative error under
   2e-7, in straight-line code the compiler vectorizes (libm's expf is a call per element) */
static inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;
  float n = rintf(x * 1.44269504f);
  float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120; p = p * r + 1.f / 24; p = p * r + 1.f / 6;
  p = p * r + 0.5f; p = p * r + 1.f; p = p * r + 1.f;
  union { int32_t i; float f; } s = {((int32_t)n + 127) << 23};
  return p * s.f;
}

static void layer_norm(const float *x, int64_t C, const float *w, const float *b, float eps,
                       float *y) {
  double sum = 0., sq = 0.;
  for (int64_t c = 0; c < C; c++) sum += x[c];
  float mean = (float)(sum / C);
  for (int64_t c = 0; c < C; c++) { double d = x[c] - mean; sq += d * d; }
  float inv = 1.f / sqrtf((float)(sq / C) + eps);
  for (int64_t c = 0; c < C; c++) y[c] = (x[c] - mean) * inv * w[c] + (b ? b[c] : 0.f);
}

static void gelu_tanh(float *x, int64_t n) { /* 0.5 x (1 + tanh(u)), tanh u = 1 - 2 / (e^2u + 1) */
  for (int64_t i = 0; i < n; i++) {
    float v = x[i], u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    x[i] = 0.5f * v * (2.f - 2.f / (exp_approx(2.f * u) + 1.f));
  }
}

/* One query (hs) over keys and values at positions [0, L) (L x hs, one after the other): out */
static void attend(const float *q, const float *k, const float *v, int64_t L, int64_t hs,
                   float scale, float *scores, float *out) {
  float top = -INFINITY, total = 0.f;
  for (int64_t t = 0; t < L; t++) {
    scores[t] = dot1_f32(k + t * hs, q, hs) * scale;
    top = scores[t] > top ? scores[t] : top;
  }
  for (int64_t t = 0; t < L; t++) scores[t] = exp_approx(scores[t] - top);
  for (int64_t t = 0; t < L; t++) total += scores[t];
  for (int64_t d = 0; d < hs; d++) out[d] = 0.f;
  for (int64_t t = 0; t < L; t++) {
    float p = scores[t] / total;
    const float *vt = v + t * hs;
    for (int64_t d = 0; d < hs; d++) out[d] += p * vt[d];
  }
}

/* x (R, C) at position pos, updated in place; kc, vc: row 0's cache (n_head, max_len, hs) of
   this layer, the next row's row_stride floats on. Returns 0, -1 out of memory, -2 a bad kind. */
int gptcli_block(const gptcli_block_weights *b, float *x, int64_t R, int64_t C, int64_t n_head,
                 int64_t pos, float *kc, float *vc, int64_t row_stride, int64_t max_len,
                 int threads) {
  int64_t hs = C / n_head, L = pos + 1, F = b->fc.N;
  float *h = malloc(sizeof(float) * R * C), *qkv = malloc(sizeof(float) * R * 3 * C);
  float *att = malloc(sizeof(float) * R * C), *f = malloc(sizeof(float) * R * F);
  float *scores = malloc(sizeof(float) * R * n_head * L);
  int rc = -1;
  if (!h || !qkv || !att || !f || !scores) goto done;
  for (int64_t r = 0; r < R; r++) layer_norm(x + r * C, C, b->ln1_w, b->ln1_b, b->eps, h + r * C);
  if ((rc = linear(&b->qkv, h, R, qkv, threads))) goto done;
  for (int64_t r = 0; r < R; r++)
    for (int64_t j = 0; j < n_head; j++) {
      int64_t at = r * row_stride + j * max_len * hs + pos * hs;
      for (int64_t d = 0; d < hs; d++) {
        kc[at + d] = qkv[r * 3 * C + C + j * hs + d];
        vc[at + d] = qkv[r * 3 * C + 2 * C + j * hs + d];
      }
    }
  float scale = 1.f / sqrtf((float)hs);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t i = 0; i < R * n_head; i++) {
    int64_t r = i / n_head, j = i % n_head, at = r * row_stride + j * max_len * hs;
    attend(qkv + r * 3 * C + j * hs, kc + at, vc + at, L, hs, scale, scores + i * L,
           att + r * C + j * hs);
  }
  if ((rc = linear(&b->proj, att, R, h, threads))) goto done;
  for (int64_t i = 0; i < R * C; i++) x[i] += h[i];
  for (int64_t r = 0; r < R; r++) layer_norm(x + r * C, C, b->ln2_w, b->ln2_b, b->eps, h + r * C);
  if ((rc = linear(&b->fc, h, R, f, threads))) goto done;
  gelu_tanh(f, R * F);
  if ((rc = linear(&b->out, f, R, h, threads))) goto done;
  for (int64_t i = 0; i < R * C; i++) x[i] += h[i];
done:
  free(h); free(qkv); free(att); free(f); free(scores);
  return rc;
}
