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
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define BLOCK 1024 /* an int32 sum of 1024 products of |127| x |16383| cannot overflow */
#define XMAX 16383.f

/* One parallel region (PARALLEL) whose threads each take their share of the output rows
   (SHARE, below); in a block, one region for the whole block, SINGLE and BARRIER between
   its steps */
#ifdef _OPENMP
int omp_get_thread_num(void); /* (declared here: a compiler that takes -fopenmp may lack omp.h) */
int omp_get_num_threads(void);
#define PARALLEL _Pragma("omp parallel num_threads(threads)")
#define SINGLE _Pragma("omp single")
#define BARRIER _Pragma("omp barrier")
#define FOR _Pragma("omp for schedule(static)")
#define THREAD ((int64_t)omp_get_thread_num())
#define THREADS ((int64_t)omp_get_num_threads())
#else
#define PARALLEL
#define SINGLE
#define BARRIER
#define FOR
#define THREAD ((int64_t)0)
#define THREADS ((int64_t)1)
#endif
/* in fours (int4 takes four rows at a time, and which rows go together must not depend on
   the threads: the same results on any number), the last thread also the rest */
#define SHARE(N, n0, n1)                                                                   \
  int64_t n0 = (N) / 4 * THREAD / THREADS * 4,                                             \
          n1 = THREAD + 1 == THREADS ? (N) : (N) / 4 * (THREAD + 1) / THREADS * 4

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

/* a * b + c, one rounding where the CPU has FMA, whatever the compiler would have contracted:
   loops that must agree bit for bit (attention over a float32 or an fp16 cache) write it */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MADD(a, b, c) fmaf(a, b, c)
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* Each thread reads its run of weight rows front to back, asking for the weights AHEAD bytes
   on as it goes, a line per 64 bytes read (int8, bf16, float32), or (int4) for rows 2 LEAD rows
   on. On a 2-core Xeon VM the hardware prefetcher alone left memory idle between rows (int8
   blocks 2.7 ms a token with a prefetch, 3.4 without; bf16 7.1 against 8.2). On a Zen 5 VM a
   plain read of 2 threads reached 39-40 GB/s, 46-50 with lines asked for 4-8 KB ahead; asking
   a line at a time rather than a row at once (as before) made 12 blocks 1.04-1.07x faster in
   float32, 1.08-1.16x in bf16, 1.03-1.07x in int8 (8 KB and 4 KB alike, 16 KB 2-4% slower).
   A build without vector loops (no AVX2) asks for a row or more ahead at each row's start.
   The 4-row loops read less than a line a step and ask at every step: asking once a line (a
   branch) made bf16's 12 blocks at 4 rows 2-3% slower here (0.971x, 0.975x, 0.988x). */
#define LEAD 4
#define AHEAD 8192
static inline void prefetch(const void *p, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch((const char *)p + c, 0, 3);
}

/* the lines AHEAD bytes past [p, p + bytes): a hint, which never faults past the weights' end */
static inline __attribute__((always_inline)) void ahead(const void *p, int bytes) {
  for (int c = 0; c < bytes; c += 64)
    __builtin_prefetch((const void *)((uintptr_t)p + AHEAD + c), 0, 3);
}

/* ---------------------------------------------------------------- int8 weights */

/* x's rows rounded to 15-bit integers, each with its own step (max |x| / 16383); a row holding
   a NaN gets a NaN step, so its results are NaN as torch's would be (an infinity: inf * 0) */
static void round_rows(const float *x, int64_t M, int64_t K, int16_t *xq, float *step) {
  for (int64_t m = 0; m < M; m++) {
    const float *r = x + m * K;
    float amax = 0.f;
    int nan = 0;
    int64_t k = 0;
#if defined(__AVX512F__) /* (libm's fmaxf and lrintf are a call per element) */
    __m512 top = _mm512_setzero_ps();
    __mmask16 odd = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 v = _mm512_loadu_ps(r + k);
      odd |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      top = _mm512_max_ps(top, _mm512_abs_ps(v));
    }
    amax = _mm512_reduce_max_ps(top);
    nan = odd != 0;
#elif defined(__AVX2__)
    __m256 top = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (; k + 8 <= K; k += 8) {
      __m256 v = _mm256_loadu_ps(r + k);
      odd = _mm256_or_ps(odd, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      top = _mm256_max_ps(top, _mm256_and_ps(v, mag));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, top);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    nan = _mm256_movemask_ps(odd) != 0;
#endif
    for (; k < K; k++) { amax = fmaxf(amax, fabsf(r[k])); nan |= r[k] != r[k]; }
    step[m] = nan ? NAN : amax > 0.f ? amax / XMAX : 1.f;
    float inv = 1.f / step[m];
    k = 0;
#if defined(__AVX512F__) /* rounded to nearest even, as lrintf; a NaN (inf * 0) to 0, as there */
    __m512 vinv = _mm512_set1_ps(inv);
    for (; k + 16 <= K; k += 16) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(r + k), vinv);
      __m512i q = _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);
      _mm256_storeu_si256((__m256i *)(xq + m * K + k), _mm512_cvtsepi32_epi16(q));
    }
#elif defined(__AVX2__)
    __m256 vinv = _mm256_set1_ps(inv);
    for (; k + 16 <= K; k += 16) {
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(r + k), vinv);
      __m256 b = _mm256_mul_ps(_mm256_loadu_ps(r + k + 8), vinv);
      __m256i qa = _mm256_and_si256(_mm256_cvtps_epi32(a),
                                    _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_ORD_Q)));
      __m256i qb = _mm256_and_si256(_mm256_cvtps_epi32(b),
                                    _mm256_castps_si256(_mm256_cmp_ps(b, b, _CMP_ORD_Q)));
      __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(qa, qb), 0xD8); /* lane order */
      _mm256_storeu_si256((__m256i *)(xq + m * K + k), q);
    }
#endif
    for (; k < K; k++) xq[m * K + k] = (int16_t)lrintf(r[k] * inv);
  }
}

/* w . a over [k0, k1), at most BLOCK long: exact in int32 */
static inline int32_t dot1_int8(const int8_t *w, const int16_t *a, int64_t k0, int64_t k1) {
  int64_t k = k0;
  int32_t sum = 0;
#ifdef ILANES
  ivec s0 = IZERO(), s1 = IZERO(), s2 = IZERO(), s3 = IZERO();
  for (; k + 4 * ILANES <= k1; k += 4 * ILANES) {
    ahead(w + k, 4 * ILANES);
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
    ahead(w + k, ILANES); /* (a line asked for twice or more: see FLANES' below) */
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

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* With AVX-512 VNNI, bytes times bytes (vpdpbusd: 64 products an instruction, no widening):
   widening 32 weights to int16 (vpmovsxbw) before vpdpwssd cost more than reading them (on a
   Zen 4 VM, 2 threads, GPT-2's products at batch 1: 5.9-7.1 ms a token, 17-21 GB/s, against
   4.6-5.9 ms, 21-27 GB/s, this way). vpdpbusd multiplies unsigned bytes by signed ones: the
   weights go unsigned as w + 128 (the top bit flipped), each rounded activation as two signed
   bytes a = 128 hi + lo (hi = a >> 7 in [-128, 127], lo = a & 127), and
   w . a = 128 (w + 128) . hi + (w + 128) . lo - 128 sum(a),
   with sum(a) per block of the row (``int8_bytes``). The same integer sums as the int16 code,
   exactly: a lane's sums stay under 2^22 in a BLOCK, and the lanes are added in 64 bits.
   Rows in fours keep the int16 code (one widening serves four rows there): the bytes' four-row
   loop made decoding at batch 4 0.87-0.97x as fast (int8, 3 alternating rounds). */
#define INT8_BYTES 1
#define NSUMS(K) ((K) / BLOCK + 1) /* a row's blocks (and one spare) */

/* row m's bytes: hi at xb + 2 m K, lo K on; sums: each block's sum of a over its whole 64s;
   for the rows that go alone only (those after the last four: int8_rows) */
static void int8_bytes(const int16_t *xq, int64_t M, int64_t K, int8_t *xb, int32_t *sums) {
  for (int64_t m = M / 4 * 4; m < M; m++) {
    const int16_t *r = xq + m * K;
    int8_t *hi = xb + 2 * m * K, *lo = hi + K;
    for (int64_t k = 0; k < K; k++) { hi[k] = (int8_t)(r[k] >> 7); lo[k] = (int8_t)(r[k] & 127); }
    for (int64_t k0 = 0, i = 0; k0 < K; k0 += BLOCK, i++) {
      int64_t k1 = k0 + BLOCK < K ? k0 + BLOCK : K, kv = k0 + (k1 - k0) / 64 * 64;
      int32_t s = 0;
      for (int64_t k = k0; k < kv; k++) s += r[k];
      sums[m * NSUMS(K) + i] = s;
    }
  }
}

static inline int64_t sum64(__m512i v) {
  return _mm512_reduce_add_epi64(_mm512_add_epi64(
      _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
      _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}

#define FLIP _mm512_set1_epi8((char)0x80)
#define WBYTES(p) _mm512_xor_si512(_mm512_loadu_si512((const void *)(p)), FLIP)
#define BYTES(p) _mm512_loadu_si512((const void *)(p))

/* w . a over [k0, k1), at most BLOCK long, a's row given as its bytes (hi; lo K on) and xq
   (the rest after the whole 64s) */
static inline int32_t dot1_bytes(const int8_t *w, const int8_t *hi, const int16_t *a,
                                 int64_t K, int64_t k0, int64_t k1, int32_t asum) {
  const int8_t *lo = hi + K;
  int64_t k = k0, kv = k0 + (k1 - k0) / 64 * 64;
  __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
  for (; k + 128 <= kv; k += 128) {
    ahead(w + k, 128);
    __m512i u = WBYTES(w + k), v = WBYTES(w + k + 64);
    h0 = _mm512_dpbusd_epi32(h0, u, BYTES(hi + k)); l0 = _mm512_dpbusd_epi32(l0, u, BYTES(lo + k));
    h1 = _mm512_dpbusd_epi32(h1, v, BYTES(hi + k + 64));
    l1 = _mm512_dpbusd_epi32(l1, v, BYTES(lo + k + 64));
  }
  for (; k < kv; k += 64) {
    __m512i u = WBYTES(w + k);
    h0 = _mm512_dpbusd_epi32(h0, u, BYTES(hi + k)); l0 = _mm512_dpbusd_epi32(l0, u, BYTES(lo + k));
  }
  int64_t sum = 128 * sum64(_mm512_add_epi32(h0, h1)) + sum64(_mm512_add_epi32(l0, l1)) -
                128 * (int64_t)asum;
  for (; k < k1; k++) sum += (int32_t)w[k] * a[k];
  return (int32_t)sum;
}

#endif

/* rows [n0, n1) of y (M, N) = xq . q^T (int8 weights q (N, K), one scale per output row;
   activations xq rounded to 15 bits per row, each with its step) + bias */
static void int8_rows(const int16_t *xq, const float *step, const int8_t *xb,
                      const int32_t *bsums, int64_t M, int64_t K, const int8_t *q,
                      const float *scale, const float *bias, float *y, int64_t N, int64_t n0,
                      int64_t n1) {
  (void)xb; (void)bsums; /* (AVX-512 VNNI only: int8_bytes') */
  for (int64_t n = n0; n < n1; n++) {
    const int8_t *w = q + n * K;
#ifndef ILANES /* (the vector loops ask for the lines ahead themselves) */
    if (n + LEAD < n1) prefetch(w + LEAD * K, K);
#endif
    float b = bias ? bias[n] : 0.f;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      int64_t sums[4] = {0, 0, 0, 0};
      for (int64_t k0 = 0; k0 < K; k0 += BLOCK) /* (four rows: see INT8_BYTES) */
        dot4_int8(w, xq + m * K, K, k0, k0 + BLOCK < K ? k0 + BLOCK : K, sums);
      for (int i = 0; i < 4; i++) y[(m + i) * N + n] = (float)sums[i] * step[m + i] * scale[n] + b;
    }
    for (; m < M; m++) {
      int64_t sum = 0;
      for (int64_t k0 = 0, i = 0; k0 < K; k0 += BLOCK, i++) {
        int64_t k1 = k0 + BLOCK < K ? k0 + BLOCK : K;
#ifdef INT8_BYTES
        sum += dot1_bytes(w, xb + 2 * m * K, xq + m * K, K, k0, k1, bsums[m * NSUMS(K) + i]);
#else
        sum += dot1_int8(w, xq + m * K, k0, k1);
#endif
      }
      y[m * N + n] = (float)sum * step[m] * scale[n] + b;
    }
  }
}

/* int8 weights q (N, K) with one scale per output row; activations rounded to 15 bits per row
   (relative error ~1e-4, well under the weights'). Returns 0, or -1 if out of memory. */
int gptcli_int8(const float *x, int64_t M, int64_t K, const int8_t *q, const float *scale,
                const float *bias, float *y, int64_t N, int threads) {
  int16_t *xq = malloc(sizeof(int16_t) * M * K);
  float *step = malloc(sizeof(float) * M);
  int8_t *xb = NULL;
  int32_t *bsums = NULL;
  int bytes = 1; /* (the byte activations, where there are any, allocated) */
#ifdef INT8_BYTES
  xb = malloc((size_t)M * 2 * K);
  bsums = malloc(sizeof(int32_t) * M * NSUMS(K));
  bytes = xb && bsums;
#endif
  if (!xq || !step || !bytes) { free(xq); free(step); free(xb); free(bsums); return -1; }
  round_rows(x, M, K, xq, step);
#ifdef INT8_BYTES
  int8_bytes(xq, M, K, xb, bsums);
#endif
  PARALLEL
  {
    SHARE(N, n0, n1);
    int8_rows(xq, step, xb, bsums, M, K, q, scale, bias, y, N, n0, n1);
  }
  free(xq); free(step); free(xb); free(bsums);
  return 0;
}

/* ---------------------------------------------------------------- int4 weights */

/* w[n, k] = q * scale[n, g] + low[n, g] for k in group g (32 inputs), q in [0, 15], scale and
   low in fp16 (5 bits a weight in all, the size of llama.cpp's q4_1): two weights a byte, byte
   j of a group holding its element j (low nibble) and element j + 16 (high). With activations
   a rounded as for int8: w . a = sum_g scale_g (q_g . a_g) + sum_g low_g sum(a_g), the second
   from the groups' sums of a (the same for every output row).

   Groups go two at a time: the 32 bytes of groups A and B split into low and high nibbles are
   [A0-15 B0-15] and [A16-31 B16-31], so each 64 activations are stored in that order (once per
   product), and one vector of integer sums holds A in its first half, B in the second, to be
   scaled by [sA.., sB..] (on AVX2, two vectors, one a group). An odd last group goes alone.
   With AVX-512 VNNI, four at a time (quad_weights). */
#define GROUP 32

static inline float from_f16(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
  if (e == 0) { float f = ldexpf((float)m, -24); return sign ? -f : f; }
  union { uint32_t u; float f; } v = {sign | (e == 31 ? 0x7f800000u | (m << 13)
                                                     : ((e + 112) << 23) | (m << 13))};
  return v.f;
#endif
}

/* each row's groups' sums of its activations, then each 64 in pair order (0-15, 32-47, 16-31,
   48-63) */
static void pair_order(int16_t *xq, int64_t M, int64_t K, float *sums) {
  int64_t G = K / GROUP;
  for (int64_t i = 0; i < M * G; i++) {
    int32_t s = 0;
    for (int j = 0; j < GROUP; j++) s += xq[i * GROUP + j];
    sums[i] = (float)s;
  }
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k + 2 * GROUP <= K; k += 2 * GROUP) {
      int16_t *r = xq + m * K + k, t[16];
      for (int j = 0; j < 16; j++) { t[j] = r[16 + j]; r[16 + j] = r[32 + j]; r[32 + j] = t[j]; }
    }
}

/* one group alone (activations in plain order), not scaled */
static inline int32_t group_dot(const uint8_t *p, const int16_t *a) {
  int32_t s = 0;
  for (int j = 0; j < GROUP / 2; j++) s += (p[j] & 15) * a[j] + (p[j] >> 4) * a[j + GROUP / 2];
  return s;
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
/* acc + low_g * sums_g in its lanes, the last 16 (or fewer) masked: no scalar chain after */
static inline __m512 low_lanes(__m512 acc, const uint16_t *low, const float *sums, int64_t G) {
  for (int64_t g = 0; g < G; g += 16) {
    __mmask16 k = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, low + g)),
                          _mm512_maskz_loadu_ps(k, sums + g), acc);
  }
  return acc;
}
#endif

/* sum_g low_g * sums_g */
static inline float low_term(const uint16_t *low, const float *sums, int64_t G) {
  int64_t g = 0;
  float s = 0.f;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  s = _mm512_reduce_add_ps(low_lanes(_mm512_setzero_ps(), low, sums, G));
  g = G;
#elif defined(__AVX512F__)
  __m512 v = _mm512_setzero_ps();
  for (; g + 16 <= G; g += 16)
    v = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(low + g))),
                        _mm512_loadu_ps(sums + g), v);
  s = _mm512_reduce_add_ps(v);
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  __m256 v = _mm256_setzero_ps();
  for (; g + 8 <= G; g += 8)
    v = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(low + g))),
                        _mm256_loadu_ps(sums + g), v);
  s = fsum(v);
#endif
  for (; g < G; g++) s += from_f16(low[g]) * sums[g];
  return s;
}

#if defined(__AVX512BW__) && defined(__F16C__)
#define PAIRS_VEC 1
typedef __m512 pvec;
#define PZERO() _mm512_setzero_ps()
#define PSUM(v) _mm512_reduce_add_ps(v)
#define PADD(a, b) _mm512_add_ps(a, b)
typedef struct { __m512i lo, hi; __m512 s; } pair;
static inline pair unpack(const uint8_t *p, const uint16_t *scale) {
  __m256i b = _mm256_loadu_si256((const __m256i *)p), m = _mm256_set1_epi8(0x0F);
  uint32_t two;
  __builtin_memcpy(&two, scale, sizeof two);
  __m128 s = _mm_cvtph_ps(_mm_cvtsi32_si128((int)two)); /* sA, sB */
  pair q = {_mm512_cvtepu8_epi16(_mm256_and_si256(b, m)),
            _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), m)),
            _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                  _mm512_castps128_ps512(s))};
  return q;
}
static inline pvec pair_fma(pvec acc, pair q, const int16_t *a) {
  __m512i d = IMADD(IMADD(IZERO(), q.lo, ILOAD(a)), q.hi, ILOAD(a + 32));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), q.s, acc);
}
#elif !defined(__AVX512BW__) && defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define PAIRS_VEC 1
typedef __m256 pvec;
#define PZERO() _mm256_setzero_ps()
#define PSUM(v) fsum(v)
#define PADD(a, b) _mm256_add_ps(a, b)
typedef struct { __m256i a0, b0, a1, b1; __m256 sa, sb; } pair;
static inline pair unpack(const uint8_t *p, const uint16_t *scale) {
  __m256i b = _mm256_loadu_si256((const __m256i *)p), m = _mm256_set1_epi8(0x0F);
  __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  pair q = {_mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo)),
            _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1)),
            _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi)),
            _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1)),
            _mm256_set1_ps(from_f16(scale[0])), _mm256_set1_ps(from_f16(scale[1]))};
  return q;
}
static inline pvec pair_fma(pvec acc, pair q, const int16_t *a) {
  __m256i da = _mm256_add_epi32(_mm256_madd_epi16(q.a0, ILOAD(a)),
                                _mm256_madd_epi16(q.a1, ILOAD(a + 32)));
  __m256i db = _mm256_add_epi32(_mm256_madd_epi16(q.b0, ILOAD(a + 16)),
                                _mm256_madd_epi16(q.b1, ILOAD(a + 48)));
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(da), q.sa, acc);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(db), q.sb, acc);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
/* With AVX-512 VNNI, bytes times bytes (vpdpbusd: 64 products an instruction) on the 4-bit
   values as they are, each activation split into a signed high byte and an unsigned low one
   (a = 256 hi + lo): each pair's 128 bytes in ab are its 64 activations' high bytes, then their
   low bytes, in pair order; the integer sums' lanes hold A, B, A, B by fours. */
#define PAIR_BYTES 1
static inline __m512i pair_weights(const uint8_t *p) { /* [A0-15 B0-15 A16-31 B16-31] */
  __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
  return _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4), _mm512_set1_epi8(0x0F));
}
static inline __m512 spread(__m512 sc, int j) { /* [s_j x4, s_j+1 x4, s_j x4, s_j+1 x4] */
  __m512i a = _mm512_set1_epi32(j), b = _mm512_set1_epi32(j + 1);
  return _mm512_permutexvar_ps(_mm512_mask_blend_epi32(0xF0F0, a, b), sc);
}
static inline __m512 pair_scales(const uint16_t *s) { /* [sA x4, sB x4, sA x4, sB x4] */
  uint32_t two;
  __builtin_memcpy(&two, s, sizeof two);
  return spread(_mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)two))), 0);
}
static inline __m512 pair_bytes(__m512 acc, __m512i q, __m512 s, const uint8_t *ab) {
  __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(ab));
  /* 256 hi + lo: the low bytes' products summed onto the shifted high ones in one step */
  __m512i d = _mm512_dpbusd_epi32(_mm512_slli_epi32(hi, 8), _mm512_loadu_si512(ab + 64), q);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc);
}
/* Four groups at a time (a quad, 128 weights): their 64 bytes as they are, low nibbles
   [A0-15 B0-15 C0-15 D0-15] and high ones [A16-31 B16-31 C16-31 D16-31], each lane of the
   integer sums one group's (A x4, B x4, C x4, D x4). A weight row's 128 weights take 12 vector
   instructions where two pairs took 20 (one load, shift and two masks instead of two
   broadcasts, shifts and masks; one conversion and multiply-add instead of two). On a Zen 4
   the 4 products of a block, in cache, ran 1.25x faster at 1 activation row and 1.2x at 4;
   from memory at 1 row, as fast as before (the memory's speed). A quad's 256 bytes in ab: the
   high bytes of its activations in that order, then the low ones; a last pair (G % 4 = 2 or
   3) stays a pair. */
typedef struct { __m512i lo, hi; } quad;
static inline quad quad_weights(const uint8_t *p) {
  __m512i v = _mm512_loadu_si512((const void *)p), m = _mm512_set1_epi8(0x0F);
  quad q = {_mm512_and_si512(v, m), _mm512_and_si512(_mm512_srli_epi16(v, 4), m)};
  return q;
}
static inline __m512i quad_index(int j) { /* lanes' groups j .. j + 3, four lanes each */
  return _mm512_set_epi32(j + 3, j + 3, j + 3, j + 3, j + 2, j + 2, j + 2, j + 2,
                          j + 1, j + 1, j + 1, j + 1, j, j, j, j);
}
static inline __m512 quad_scales(const uint16_t *s) { /* [sA x4, sB x4, sC x4, sD x4] */
  __m128 f = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)s));
  return _mm512_permutexvar_ps(quad_index(0), _mm512_castps128_ps512(f));
}
static inline __m512i quad_sums(quad q, const uint8_t *ab) { /* 256 hi + lo, as pair_bytes */
  __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q.lo, _mm512_loadu_si512(ab));
  d = _mm512_slli_epi32(_mm512_dpbusd_epi32(d, q.hi, _mm512_loadu_si512(ab + 64)), 8);
  d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(ab + 128), q.lo);
  return _mm512_dpbusd_epi32(d, _mm512_loadu_si512(ab + 192), q.hi);
}
static inline __m512 quad_bytes(__m512 acc, quad q, __m512 s, const uint8_t *ab) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(quad_sums(q, ab)), s, acc);
}
#endif

/* out[i] = w . a_i for R (1 or 4) rows a_i of xq (K apart, in pair order; sums G apart) */
static inline void int4_dots(const uint8_t *p, const uint16_t *scale, const uint16_t *low,
                             const int16_t *a, const uint8_t *ab, const float *sums, int64_t K,
                             int R, float *out) {
  int64_t G = K / GROUP, g = 0;
  float part[4] = {0.f, 0.f, 0.f, 0.f};
  int lows = 0; /* the lows' term already in part */
  (void)ab; /* (the bytes: AVX-512 VNNI only) */
#if defined(PAIR_BYTES)
  lows = 1;
  if (R == 4) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; g + 4 <= G; g += 4) {
      quad q = quad_weights(p + g * GROUP / 2);
      __m512 sc = quad_scales(scale + g);
      const uint8_t *at = ab + g * 64;
      s0 = quad_bytes(s0, q, sc, at); s1 = quad_bytes(s1, q, sc, at + 2 * K);
      s2 = quad_bytes(s2, q, sc, at + 4 * K); s3 = quad_bytes(s3, q, sc, at + 6 * K);
    }
    if (g + 2 <= G) {
      __m512i q = pair_weights(p + g * GROUP / 2);
      __m512 sc = pair_scales(scale + g);
      const uint8_t *at = ab + g * 64;
      s0 = pair_bytes(s0, q, sc, at); s1 = pair_bytes(s1, q, sc, at + 2 * K);
      s2 = pair_bytes(s2, q, sc, at + 4 * K); s3 = pair_bytes(s3, q, sc, at + 6 * K);
      g += 2;
    }
    s0 = low_lanes(s0, low, sums, G); s1 = low_lanes(s1, low, sums + G, G);
    s2 = low_lanes(s2, low, sums + 2 * G, G); s3 = low_lanes(s3, low, sums + 3 * G, G);
    part[0] = _mm512_reduce_add_ps(s0); part[1] = _mm512_reduce_add_ps(s1);
    part[2] = _mm512_reduce_add_ps(s2); part[3] = _mm512_reduce_add_ps(s3);
  } else {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    for (; g + 8 <= G; g += 8) { /* 8 groups' scales converted at once */
      __m512 sc = _mm512_castps256_ps512(_mm256_cvtph_ps(
          _mm_loadu_si128((const __m128i *)(scale + g))));
      s0 = quad_bytes(s0, quad_weights(p + g * GROUP / 2),
                      _mm512_permutexvar_ps(quad_index(0), sc), ab + g * 64);
      s1 = quad_bytes(s1, quad_weights(p + (g + 4) * GROUP / 2),
                      _mm512_permutexvar_ps(quad_index(4), sc), ab + (g + 4) * 64);
    }
    if (g + 4 <= G) {
      s0 = quad_bytes(s0, quad_weights(p + g * GROUP / 2), quad_scales(scale + g), ab + g * 64);
      g += 4;
    }
    if (g + 2 <= G) {
      s1 = pair_bytes(s1, pair_weights(p + g * GROUP / 2), pair_scales(scale + g), ab + g * 64);
      g += 2;
    }
    part[0] = _mm512_reduce_add_ps(low_lanes(_mm512_add_ps(s0, s1), low, sums, G));
  }
#elif defined(PAIRS_VEC)
  if (R == 4) {
    pvec s0 = PZERO(), s1 = PZERO(), s2 = PZERO(), s3 = PZERO();
    for (; g + 2 <= G; g += 2) {
      pair q = unpack(p + g * GROUP / 2, scale + g);
      const int16_t *ag = a + g * GROUP;
      s0 = pair_fma(s0, q, ag); s1 = pair_fma(s1, q, ag + K);
      s2 = pair_fma(s2, q, ag + 2 * K); s3 = pair_fma(s3, q, ag + 3 * K);
    }
    part[0] = PSUM(s0); part[1] = PSUM(s1); part[2] = PSUM(s2); part[3] = PSUM(s3);
  } else {
    pvec s0 = PZERO(), s1 = PZERO();
    for (; g + 4 <= G; g += 4) {
      s0 = pair_fma(s0, unpack(p + g * GROUP / 2, scale + g), a + g * GROUP);
      s1 = pair_fma(s1, unpack(p + (g + 2) * GROUP / 2, scale + g + 2), a + (g + 2) * GROUP);
    }
    if (g + 2 <= G) {
      s0 = pair_fma(s0, unpack(p + g * GROUP / 2, scale + g), a + g * GROUP);
      g += 2;
    }
    part[0] = PSUM(PADD(s0, s1));
  }
#endif
  for (int i = 0; i < R; i++) {
    const int16_t *ai = a + i * K;
    float s = part[i];
    int64_t h = g;
    for (; h + 2 <= G; h += 2) { /* (plain C) */
      const uint8_t *pa = p + h * GROUP / 2, *pb = pa + GROUP / 2;
      const int16_t *ap = ai + h * GROUP;
      int32_t da = 0, db = 0;
      for (int j = 0; j < 16; j++) {
        da += (pa[j] & 15) * ap[j] + (pa[j] >> 4) * ap[32 + j];
        db += (pb[j] & 15) * ap[16 + j] + (pb[j] >> 4) * ap[48 + j];
      }
      s += from_f16(scale[h]) * (float)da + from_f16(scale[h + 1]) * (float)db;
    }
    if (h < G) s += from_f16(scale[h]) * (float)group_dot(p + h * GROUP / 2, ai + h * GROUP);
    out[i] = lows ? s : s + low_term(low, sums + i * G, G);
  }
}

/* x's rows as the integer products read them: rounded to 15 bits (xq), each with its step;
   for int4 also in pair order, with their groups' sums and (AVX-512 VNNI) as bytes (ab, in
   quads and a last pair: see quad_weights) */
typedef struct { int16_t *xq; float *step, *sums, *xs; uint8_t *ab; int32_t *bsums; } acts;

static int acts_new(acts *a, int64_t M, int64_t K) { /* 0, or -1 out of memory */
  a->xq = malloc(sizeof(int16_t) * M * K);
  a->step = malloc(sizeof(float) * M);
  a->sums = malloc(sizeof(float) * M * (K / GROUP + 1));
  a->ab = malloc((size_t)M * 2 * K);
  a->xs = malloc(sizeof(float) * M * K);
  a->bsums = malloc(sizeof(int32_t) * M * (K / BLOCK + 1));
  return a->xq && a->step && a->sums && a->ab && a->xs && a->bsums ? 0 : -1;
}

static void acts_free(acts *a) {
  free(a->xq); free(a->step); free(a->sums); free(a->ab); free(a->xs); free(a->bsums);
}

static void int4_acts(const float *x, int64_t M, int64_t K, acts *a) {
  round_rows(x, M, K, a->xq, a->step);
  pair_order(a->xq, M, K, a->sums);
#if defined(PAIR_BYTES)
  /* xq's pairs AB, CD in a quad: [A0-15 B0-15 A16-31 B16-31 C0-15 D0-15 C16-31 D16-31], its
     bytes in quad order: 32-value pieces 0, 2, 1, 3; a last pair's as they are */
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k + 2 * GROUP <= K; ) {
      int quads = k + 4 * GROUP <= K, n = quads ? 4 * GROUP : 2 * GROUP;
      for (int j = 0; j < n; j += 32) {
        int from = quads ? (j / 32 == 1 ? 64 : j / 32 == 2 ? 32 : j) : j;
        __m512i v = _mm512_loadu_si512((const void *)(a->xq + m * K + k + from));
        uint8_t *o = a->ab + m * 2 * K + 2 * k + j;
        _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)));
        _mm256_storeu_si256((__m256i *)(o + n), _mm512_cvtepi16_epi8(v));
      }
      k += n;
    }
#endif
}

#if defined(PAIR_BYTES)
/* out[i * 4 + r] = w_r . a_i for four weight rows w_r (K / 2 bytes apart) and A (1 or 4)
   activation rows a_i (their bytes ab, 2 K apart; sums G apart): each weight vector and each
   activation load shared, 4 A independent sums, the scales eight groups at a time; G = K / 32
   even. ahead (or NULL): four rows to prefetch, two lines a step, so that memory sees an even
   stream (all at once, as the one-row code does, left a 768x3072 product 1.3x slower on a Zen
   5; none at all, 1.5-1.8x). */
static inline __attribute__((always_inline)) void int4_four(
    const uint8_t *p, const uint16_t *scale, const uint16_t *low, const uint8_t *ab,
    const float *sums, int64_t K, int A, float *out, const uint8_t *ahead) {
  int64_t G = K / GROUP, H = K / 2, g = 0;
  __m512 acc[4][4], sc[4];
  for (int r = 0; r < 4; r++) {
    sc[r] = _mm512_setzero_ps();
    for (int i = 0; i < A; i++) acc[i][r] = _mm512_setzero_ps();
  }
  for (; g + 4 <= G; g += 4) {
    if (g % 8 == 0)
      for (int r = 0; r < 4; r++) /* (up to 8 groups' scales: G - g may be 4 or 6) */
        sc[r] = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_maskz_loadu_epi16(
            G - g >= 8 ? 0xFF : (__mmask8)((1u << (G - g)) - 1), scale + r * G + g)));
    if (ahead) /* the four rows ahead (4 K / 2 bytes) over this call's G / 4 steps */
      for (int c = 0; c < 4; c++) __builtin_prefetch(ahead + g * 64 + c * 64, 0, 3);
    quad q[4];
    __m512i ix = quad_index((int)(g % 8));
    for (int r = 0; r < 4; r++) q[r] = quad_weights(p + r * H + g * GROUP / 2);
    for (int i = 0; i < A; i++)
      for (int r = 0; r < 4; r++)
        acc[i][r] = quad_bytes(acc[i][r], q[r], _mm512_permutexvar_ps(ix, sc[r]),
                               ab + i * 2 * K + g * 64);
  }
  if (g + 2 <= G) { /* a last pair */
    if (g % 8 == 0)
      for (int r = 0; r < 4; r++)
        sc[r] = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_maskz_loadu_epi16(
            0x3, scale + r * G + g)));
    if (ahead) {
      __builtin_prefetch(ahead + g * 64, 0, 3);
      __builtin_prefetch(ahead + g * 64 + 64, 0, 3);
    }
    __m512i q[4];
    for (int r = 0; r < 4; r++) q[r] = pair_weights(p + r * H + g * GROUP / 2);
    for (int i = 0; i < A; i++)
      for (int r = 0; r < 4; r++)
        acc[i][r] = pair_bytes(acc[i][r], q[r], spread(sc[r], (int)(g % 8)),
                               ab + i * 2 * K + g * 64);
  }
  for (int i = 0; i < A; i++)
    for (int r = 0; r < 4; r++)
      out[i * 4 + r] = _mm512_reduce_add_ps(low_lanes(acc[i][r], low + r * G, sums + i * G, G));
}
/* int4_four for one activation row and for four, each compiled on its own */
static __attribute__((noinline)) void int4_four1(
    const uint8_t *p, const uint16_t *scale, const uint16_t *low, const uint8_t *ab,
    const float *sums, int64_t K, float *out, const uint8_t *ahead) {
  int4_four(p, scale, low, ab, sums, K, 1, out, ahead);
}
static __attribute__((noinline)) void int4_four4(
    const uint8_t *p, const uint16_t *scale, const uint16_t *low, const uint8_t *ab,
    const float *sums, int64_t K, float *out, const uint8_t *ahead) {
  int4_four(p, scale, low, ab, sums, K, 4, out, ahead);
}
#endif

/* rows [n0, n1) of y (M, N) = x . w^T + bias, x's M rows prepared by int4_acts */
static void int4_rows(const acts *a, int64_t M, int64_t K, const uint8_t *p,
                      const uint16_t *scale, const uint16_t *low, const float *bias, float *y,
                      int64_t N, int64_t n0, int64_t n1) {
  int64_t G = K / GROUP, n = n0;
#if defined(PAIR_BYTES)
  if (G % 2 == 0) /* four weight rows at a time, four activation rows too (all but odd G) */
    for (; n + 4 <= n1; n += 4) {
      const uint8_t *ahead = NULL; /* the weights 2 LEAD rows on, a line at a time (above) */
      if (n + 2 * LEAD + 4 <= n1) {
        ahead = p + (n + 2 * LEAD) * (K / 2);
        prefetch(scale + (n + 2 * LEAD) * G, 4 * G * 2);
        prefetch(low + (n + 2 * LEAD) * G, 4 * G * 2);
      }
      const uint8_t *w = p + n * (K / 2);
      float out[16], b[4];
      for (int r = 0; r < 4; r++) b[r] = bias ? bias[n + r] : 0.f;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        int4_four4(w, scale + n * G, low + n * G, a->ab + m * 2 * K, a->sums + m * G, K, out,
                   m ? NULL : ahead);
        for (int i = 0; i < 4; i++)
          for (int r = 0; r < 4; r++)
            y[(m + i) * N + n + r] = out[i * 4 + r] * a->step[m + i] + b[r];
      }
      for (; m < M; m++) {
        int4_four1(w, scale + n * G, low + n * G, a->ab + m * 2 * K, a->sums + m * G, K, out,
                   m ? NULL : ahead);
        for (int r = 0; r < 4; r++) y[m * N + n + r] = out[r] * a->step[m] + b[r];
      }
    }
#endif
  for (; n < n1; n++) {
    const uint8_t *r = p + n * (K / 2);
    const uint16_t *sc = scale + n * G, *lo = low + n * G;
    if (n + 2 * LEAD < n1) {
      prefetch(r + 2 * LEAD * (K / 2), K / 2);
      prefetch(sc + 2 * LEAD * G, G * 2);
      prefetch(lo + 2 * LEAD * G, G * 2);
    }
    float b = bias ? bias[n] : 0.f, out[4];
    for (int64_t m = 0; m < M; m += (M - m >= 4 ? 4 : 1)) {
      int R = M - m >= 4 ? 4 : 1;
      int4_dots(r, sc, lo, a->xq + m * K, a->ab + m * 2 * K, a->sums + m * G, K, R, out);
      for (int i = 0; i < R; i++) y[(m + i) * N + n] = out[i] * a->step[m + i] + b;
    }
  }
}

/* int4 weights p (N, K / 2) with fp16 scale, low (N, K / 32); K a multiple of 32; activations
   rounded to 15 bits per row. Returns 0, or -1 if out of memory. */
int gptcli_int4(const float *x, int64_t M, int64_t K, const uint8_t *p, const uint16_t *scale,
                const uint16_t *low, const float *bias, float *y, int64_t N, int threads) {
  acts a;
  if (acts_new(&a, M, K)) { acts_free(&a); return -1; }
  int4_acts(x, M, K, &a);
  PARALLEL
  {
    SHARE(N, n0, n1);
    int4_rows(&a, M, K, p, scale, low, bias, y, N, n0, n1);
  }
  acts_free(&a);
  return 0;
}

/* The int4 weights as float32 w (N, K), q * scale + low: a prompt's many rows take them to
   oneDNN's product (kernels.py, int4-dnn), which beats the 4-bit product at that size. */
int gptcli_int4_unpack(const uint8_t *p, const uint16_t *scale, const uint16_t *low, int64_t N,
                       int64_t K, float *w, int threads) {
  int64_t G = K / GROUP;
  PARALLEL
  {
    SHARE(N, n0, n1);
    for (int64_t n = n0; n < n1; n++)
      for (int64_t g = 0; g < G; g++) {
        const uint8_t *b = p + n * (K / 2) + g * (GROUP / 2);
        float s = from_f16(scale[n * G + g]), l = from_f16(low[n * G + g]);
        float *o = w + n * K + g * GROUP;
#if defined(__AVX512F__)
        __m128i bytes = _mm_loadu_si128((const __m128i *)b), nibble = _mm_set1_epi8(15);
        __m512 sv = _mm512_set1_ps(s), lv = _mm512_set1_ps(l);
        __m512i q0 = _mm512_cvtepu8_epi32(_mm_and_si128(bytes, nibble));
        __m512i q1 = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
        _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(q0), sv, lv));
        _mm512_storeu_ps(o + GROUP / 2, _mm512_fmadd_ps(_mm512_cvtepi32_ps(q1), sv, lv));
#else
        for (int j = 0; j < GROUP / 2; j++) { /* a byte: element j (low nibble), j + 16 */
          o[j] = (float)(b[j] & 15) * s + l;
          o[j + GROUP / 2] = (float)(b[j] >> 4) * s + l;
        }
#endif
      }
  }
  return 0;
}

/* ---------------------------------------------------------------- float weights (f32, bf16) */

static inline float from_bf16(uint16_t h) {
  union { uint32_t u; float f; } v = {(uint32_t)h << 16};
  return v.f;
}

static inline float from_f32(float v) { return v; }

/* bf16 weights become float32 by a shift: a bf16 is a float32's top half. Widening 16 of them
   in order (a lane-crossing widen, a shift) cost more than reading them: on a Zen 4 VM, 2
   threads, GPT-2's products at batch 1 ran at 17-19 GB/s, float32's at 24-27. So a vector of
   2 FLANES weights is split in place instead: its 32-bit lanes shifted left hold the weights
   at even places, the same lanes with the low half cleared those at odd places, no shuffle;
   the activations are read in the same order, prepared once per product (split_rows): in
   each run of SPLIT values the even-placed ones first, then the odd-placed. Same maths, same
   float32 sums, 1.35x faster there (9.2-11.9 ms a token against 12.9-14.5; 20-27 GB/s).
   At 4 rows the products are not short of bandwidth, and the split alone was 5% slower than
   the widening (median 13.2 ms against 12.3); asking for each line twice, at its start and
   half-way (as the widening's 32-byte steps did), made it 6% faster (11.6). */
#ifdef FLANES
#define SPLIT (2 * FLANES)
#else
#define SPLIT 1
#endif

static void split_rows(const float *x, int64_t M, int64_t K, float *xs) {
  int64_t whole = SPLIT > 1 ? K / SPLIT * SPLIT : 0, half = SPLIT / 2;
  for (int64_t m = 0; m < M; m++) {
    const float *r = x + m * K;
    float *o = xs + m * K;
    for (int64_t k0 = 0; k0 < whole; k0 += SPLIT)
      for (int64_t i = 0; i < half; i++) {
        o[k0 + i] = r[k0 + 2 * i];
        o[k0 + half + i] = r[k0 + 2 * i + 1];
      }
    for (int64_t k = whole; k < K; k++) o[k] = r[k]; /* (the rest in order, as the tail reads) */
  }
}

#ifdef FLANES
#if defined(__AVX512F__)
typedef __m512i bvec;
#define BLOAD(p) _mm512_loadu_si512((const void *)(p))
#define BEVEN(v) _mm512_castsi512_ps(_mm512_slli_epi32(v, 16))
#define BODD(v) _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000)))
#else
typedef __m256i bvec;
#define BLOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define BEVEN(v) _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
#define BODD(v) _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000)))
#endif
/* w . a over a row's whole vectors, each weight read by WLOAD as FLANES floats (float32 here;
   the fp16 keys of an attention cache below: the same sums in the same order) */
#define VECTOR_DOT1_LOADED(WLOAD)                                                           \
  fvec s0 = FZERO(), s1 = FZERO(), s2 = FZERO(), s3 = FZERO();                              \
  for (; k + 4 * FLANES <= K; k += 4 * FLANES) {                                            \
    ahead(w + k, 4 * FLANES * (int)sizeof(*w));                                             \
    s0 = FFMA(s0, WLOAD(w + k), FLOAD_f32(a + k));                                          \
    s1 = FFMA(s1, WLOAD(w + k + FLANES), FLOAD_f32(a + k + FLANES));                        \
    s2 = FFMA(s2, WLOAD(w + k + 2 * FLANES), FLOAD_f32(a + k + 2 * FLANES));                \
    s3 = FFMA(s3, WLOAD(w + k + 3 * FLANES), FLOAD_f32(a + k + 3 * FLANES));                \
  }                                                                                         \
  for (; k + FLANES <= K; k += FLANES) s0 = FFMA(s0, WLOAD(w + k), FLOAD_f32(a + k));       \
  sum = FSUM(FADD(FADD(s0, s1), FADD(s2, s3)));
#define VECTOR_DOT1_f32 VECTOR_DOT1_LOADED(FLOAD_f32)
#define VECTOR_DOT1_bf16                                                                    \
  fvec s0 = FZERO(), s1 = FZERO(), s2 = FZERO(), s3 = FZERO();                              \
  for (; k + 2 * SPLIT <= K; k += 2 * SPLIT) {                                              \
    ahead(w + k, 2 * SPLIT * (int)sizeof(*w));                                              \
    bvec u = BLOAD(w + k), v = BLOAD(w + k + SPLIT);                                        \
    s0 = FFMA(s0, BEVEN(u), FLOAD_f32(a + k));                                              \
    s1 = FFMA(s1, BODD(u), FLOAD_f32(a + k + FLANES));                                      \
    s2 = FFMA(s2, BEVEN(v), FLOAD_f32(a + k + SPLIT));                                      \
    s3 = FFMA(s3, BODD(v), FLOAD_f32(a + k + SPLIT + FLANES));                              \
  }                                                                                         \
  for (; k + SPLIT <= K; k += SPLIT) {                                                      \
    bvec u = BLOAD(w + k);                                                                  \
    s0 = FFMA(s0, BEVEN(u), FLOAD_f32(a + k));                                              \
    s1 = FFMA(s1, BODD(u), FLOAD_f32(a + k + FLANES));                                      \
  }                                                                                         \
  sum = FSUM(FADD(FADD(s0, s1), FADD(s2, s3)));
#define VECTOR_DOT4_bf16                                                                    \
  fvec s0 = FZERO(), s1 = FZERO(), s2 = FZERO(), s3 = FZERO();                              \
  fvec e0 = FZERO(), e1 = FZERO(), e2 = FZERO(), e3 = FZERO();                              \
  for (; k + SPLIT <= K; k += SPLIT) {                                                      \
    ahead(w + k, SPLIT * (int)sizeof(*w));                                                  \
    if (SPLIT * sizeof(*w) >= 64) ahead((const char *)(w + k) + 32, 32); /* (see above) */  \
    bvec u = BLOAD(w + k);                                                                  \
    fvec v = BEVEN(u), o = BODD(u);                                                         \
    s0 = FFMA(s0, v, FLOAD_f32(a0 + k)); s1 = FFMA(s1, v, FLOAD_f32(a1 + k));               \
    s2 = FFMA(s2, v, FLOAD_f32(a2 + k)); s3 = FFMA(s3, v, FLOAD_f32(a3 + k));               \
    e0 = FFMA(e0, o, FLOAD_f32(a0 + k + FLANES)); e1 = FFMA(e1, o, FLOAD_f32(a1 + k + FLANES)); \
    e2 = FFMA(e2, o, FLOAD_f32(a2 + k + FLANES)); e3 = FFMA(e3, o, FLOAD_f32(a3 + k + FLANES)); \
  }                                                                                         \
  t0 = FSUM(FADD(s0, e0)); t1 = FSUM(FADD(s1, e1));                                         \
  t2 = FSUM(FADD(s2, e2)); t3 = FSUM(FADD(s3, e3));
#define VECTOR_DOT1(T) VECTOR_DOT1_##T
#define VECTOR_DOT4(T) VECTOR_DOT4_##T
#define ROW_PREFETCH(TYPE)
#else /* (no vector loops to ask for the lines ahead: a row at a time, a row or two ahead) */
#define VECTOR_DOT1(T)
#define VECTOR_DOT4(T)
#define ROW_PREFETCH(TYPE)                                                                  \
  if (n + LEAD / (int64_t)sizeof(TYPE) < n1)                                                \
    prefetch(r + LEAD / (int64_t)sizeof(TYPE) * K, K * (int64_t)sizeof(TYPE));
#endif

/* float weights w (N, K) of type T (LOAD reads one as float), float32 activations and sums;
   T##_rows reads x as prepared for T (bf16: split_rows), gptcli_##T prepares it itself */
#define FLOAT_PRODUCT(T, TYPE, LOAD, SPLITS)                                                \
  static inline float dot1_##T(const TYPE *w, const float *a, int64_t K) {                  \
    int64_t k = 0;                                                                          \
    float sum = 0.f;                                                                        \
    VECTOR_DOT1(T)                                                                          \
    for (; k < K; k++) sum = MADD(LOAD(w[k]), a[k], sum);                                   \
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
  static void T##_rows(const float *x, int64_t M, int64_t K, const TYPE *w,                \
                       const float *bias, float *y, int64_t N, int64_t n0, int64_t n1) {    \
    for (int64_t n = n0; n < n1; n++) {                                                     \
      const TYPE *r = w + n * K;                                                            \
      ROW_PREFETCH(TYPE)                                                                    \
      float b = bias ? bias[n] : 0.f;                                                       \
      int64_t m = 0;                                                                        \
      for (; m + 4 <= M; m += 4) dot4_##T(r, x + m * K, K, y + m * N + n, N, b);            \
      for (; m < M; m++) y[m * N + n] = dot1_##T(r, x + m * K, K) + b;                      \
    }                                                                                       \
  }                                                                                         \
  int gptcli_##T(const float *x, int64_t M, int64_t K, const TYPE *w, const float *bias,   \
                 float *y, int64_t N, int threads) {                                        \
    float *xs = NULL;                                                                       \
    if (SPLITS) {                                                                           \
      if (!(xs = malloc(sizeof(float) * M * K))) return -1;                                 \
      split_rows(x, M, K, xs);                                                              \
      x = xs;                                                                               \
    }                                                                                       \
    PARALLEL                                                                                \
    {                                                                                       \
      SHARE(N, n0, n1);                                                                     \
      T##_rows(x, M, K, w, bias, y, N, n0, n1);                                             \
    }                                                                                       \
    free(xs);                                                                               \
    return 0;                                                                               \
  }

FLOAT_PRODUCT(bf16, uint16_t, from_bf16, 1)

/* float32 weights: a tile of NT weight rows against R rows of x at once (both constants where
   it is inlined: NT <= 4, R <= ROWS_TOGETHER). Each weight vector read is used for all R rows
   and each row's vector for all NT weight rows: NT + R reads for NT x R products, where one
   weight row at a time against one row of x took two reads a product (R rows cost 1.4-2x one
   row's time where they should cost about the same: the weights' reading from memory is the
   step's time). Each output has one vector sum over k in order, then its lanes added, then
   the tail, whatever NT and R: a row of x comes out bit for bit as it does alone. Speculative
   decoding relies on it: the model's check of k + 1 positions gives each the logits a step of
   one position gives, so greedy tokens are the same with a draft or without. */
#if defined(__AVX512F__)
#define ROWS_TOGETHER 4 /* 16 sums, 4 weight vectors and a row's vector in 32 registers */
#else
#define ROWS_TOGETHER 2 /* 8 sums, 4 weights and a row's in AVX2's 16 */
#endif
#define TILE 4

static inline __attribute__((always_inline)) void tile_f32(const float *w, const float *x,
                                                           int64_t K, int NT, int R,
                                                           const float *bias, float *y,
                                                           int64_t N) {
  int64_t k = 0;
  float sums[TILE][4] = {{0.f}};
#ifdef FLANES
  fvec s[TILE][4];
  for (int i = 0; i < NT; i++)
    for (int r = 0; r < R; r++) s[i][r] = FZERO();
  for (; k + FLANES <= K; k += FLANES) {
    fvec v[TILE];
    /* the tile's rows lie one after another: their lines are asked for AHEAD bytes on in
       memory order, as many a step as the step reads */
    ahead(w + NT * k, NT * FLANES * (int)sizeof(float));
    for (int i = 0; i < NT; i++) v[i] = FLOAD_f32(w + i * K + k);
    for (int r = 0; r < R; r++) {
      fvec a = FLOAD_f32(x + r * K + k);
      for (int i = 0; i < NT; i++) s[i][r] = FFMA(s[i][r], v[i], a);
    }
  }
  for (int i = 0; i < NT; i++)
    for (int r = 0; r < R; r++) sums[i][r] = FSUM(s[i][r]);
#else
  prefetch(w + NT * K, NT * K * (int64_t)sizeof(float)); /* (the next rows, as many) */
#endif
  for (int i = 0; i < NT; i++)
    for (int r = 0; r < R; r++) {
      float t = sums[i][r];
      for (int64_t j = k; j < K; j++) t = MADD(w[i * K + j], x[r * K + j], t);
      y[r * N + i] = t + (bias ? bias[i] : 0.f);
    }
}

#define TILE_ROWS(NT)                                                                       \
  for (int64_t m = 0; m < M; m += ROWS_TOGETHER) {                                          \
    const float *a = x + m * K;                                                             \
    float *o = y + m * N + n;                                                               \
    const float *b = bias ? bias + n : NULL;                                                \
    switch (M - m < ROWS_TOGETHER ? M - m : ROWS_TOGETHER) {                                \
    case 4: tile_f32(w + n * K, a, K, NT, 4, b, o, N); break;                               \
    case 3: tile_f32(w + n * K, a, K, NT, 3, b, o, N); break;                               \
    case 2: tile_f32(w + n * K, a, K, NT, 2, b, o, N); break;                               \
    default: tile_f32(w + n * K, a, K, NT, 1, b, o, N);                                     \
    }                                                                                       \
  }

/* rows [n0, n1) of y (M, N) = x . W^T + bias: a tile of weight rows at a time, against every
   row of x while they are in cache */
static void f32_rows(const float *x, int64_t M, int64_t K, const float *w, const float *bias,
                     float *y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (M > 1) /* (one row alone: a weight row at a time, one stream; four cost 5% on Zen 4) */
    for (; n + TILE <= n1; n += TILE) TILE_ROWS(TILE)
  for (; n < n1; n++) TILE_ROWS(1)
}

int gptcli_f32(const float *x, int64_t M, int64_t K, const float *w, const float *bias, float *y,
               int64_t N, int threads) {
  PARALLEL
  {
    SHARE(N, n0, n1);
    f32_rows(x, M, K, w, bias, y, N, n0, n1);
  }
  return 0;
}

/* an attention's scores (below): one float32 row, four vector sums */
static inline float dot1_f32(const float *w, const float *a, int64_t K) {
  int64_t k = 0;
  float sum = 0.f;
  VECTOR_DOT1(f32)
  for (; k < K; k++) sum = MADD(w[k], a[k], sum);
  return sum;
}

/* ---------------------------------------------------------------- a whole block, one step */

/* A block's decode step for R rows at one position (or a few positions each), in one call
   (native_step.py): layer norm, the qkv product, the new keys and values written into the
   cache, attention over the cached positions, the output product and residual, layer norm,
   the MLP (GELU, tanh form) and residual. Every operation around the products is a loop over a
   few thousand floats, which costs less here than calling it from Python costs there. */

typedef struct {
  int kind; /* 0: float32 w (N, K); 1: bf16 w (N, K); 2: int8 w (N, K) and scale (N); 3: int4 */
  const void *w, *scale, *low; /* scale: int8's float32, int4's fp16; low: int4's fp16 */
  const float *bias;
  int64_t N, K;
} gptcli_linear;

typedef struct {
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
  float eps;
  gptcli_linear qkv, proj, fc, out;
} gptcli_block_weights;

/* what a product's rows need of x first (bf16: x split; the integer kinds: x rounded; in a) */
static void prepare(const gptcli_linear *l, const float *x, int64_t M, acts *a) {
  if (l->kind == 1) split_rows(x, M, l->K, a->xs);
  if (l->kind == 2) {
    round_rows(x, M, l->K, a->xq, a->step);
#ifdef INT8_BYTES
    int8_bytes(a->xq, M, l->K, (int8_t *)a->ab, a->bsums);
#endif
  }
  if (l->kind == 3) int4_acts(x, M, l->K, a);
}

/* rows [n0, n1) of y (M, N) = x . W^T + bias, x prepared in a */
static void rows(const gptcli_linear *l, const float *x, const acts *a, int64_t M, float *y,
                 int64_t n0, int64_t n1) {
  if (l->kind == 0) f32_rows(x, M, l->K, l->w, l->bias, y, l->N, n0, n1);
  if (l->kind == 1) bf16_rows(a->xs, M, l->K, l->w, l->bias, y, l->N, n0, n1);
  if (l->kind == 2)
    int8_rows(a->xq, a->step, (const int8_t *)a->ab, a->bsums, M, l->K, l->w, l->scale, l->bias,
              y, l->N, n0, n1);
  if (l->kind == 3)
    int4_rows(a, M, l->K, l->w, l->scale, l->low, l->bias, y, l->N, n0, n1);
}

/* this thread's share of x (M, N) += in . W^T + bias (the residual sum), in prepared in a;
   h (M, N): room for the product */
static void add_rows(const gptcli_linear *l, const float *in, const acts *a, int64_t M,
                     float *h, float *x) {
  int64_t N = l->N;
  SHARE(N, n0, n1);
  rows(l, in, a, M, h, n0, n1);
  for (int64_t m = 0; m < M; m++)
    for (int64_t n = n0; n < n1; n++) x[m * N + n] += h[m * N + n];
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

/* ---------------------------------------------------------------- keys and values in fp16

   Where the weights are rounded (half, int8, int4) the keys and values are too: to fp16, as
   llama.cpp keeps them, so the cache is half the bytes and attention at a long context reads
   half as much (kv_cache.py). These are the conversions torch's own make (round to nearest
   even; past 65504: infinity), so the cache holds what torch would write there. */

static inline uint16_t to_f16(float f) {
#if defined(__F16C__)
  return (uint16_t)_cvtss_sh(f, 0); /* (0: to nearest even) */
#else
  union { float f; uint32_t u; } v = {f};
  uint32_t sign = (v.u >> 16) & 0x8000, a = v.u & 0x7fffffff;
  if (a > 0x7f800000) return (uint16_t)(sign | 0x7e00); /* NaN */
  if (a >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* 65520 and up round to infinity */
  if (a < 0x38800000) /* under 2^-14: a multiple of 2^-24 (1024 of them: the smallest normal) */
    return (uint16_t)(sign | (uint32_t)nearbyintf(fabsf(f) * 16777216.f));
  uint32_t h = (a >> 13) - (112 << 10), rest = a & 0x1fff; /* exponent re-biased 127 -> 15 */
  return (uint16_t)(sign | (h + (rest > 0x1000 || (rest == 0x1000 && (h & 1)))));
#endif
}

#if defined(FLANES) && defined(__AVX512F__)
#define HLOAD(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define FSET1(v) _mm512_set1_ps(v)
#define FSTORE(p, v) _mm512_storeu_ps(p, v)
#elif defined(FLANES) && defined(__F16C__)
#define HLOAD(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define FSET1(v) _mm256_set1_ps(v)
#define FSTORE(p, v) _mm256_storeu_ps(p, v)
#endif

/* dot1_f32 for fp16 weights w (an attention's keys): the same sums in the same order, so the
   same scores from an fp16 cache as from a float32 one holding the same values (kv 1) */
static inline float dot1_f16(const uint16_t *w, const float *a, int64_t K) {
  int64_t k = 0;
  float sum = 0.f;
#if defined(HLOAD)
  VECTOR_DOT1_LOADED(HLOAD)
#endif
  for (; k < K; k++) sum = MADD(from_f16(w[k]), a[k], sum);
  return sum;
}

/* One query (hs) over keys and values of type TYPE at positions [0, L) (L x hs, one after
   the other): out. The same code for both types, so that a float32 cache holding fp16 values
   (kv 1) gives the fp16 cache's results bit for bit. */
#if defined(HLOAD)
#define VALUES(VLOAD)                                                                        \
  fvec pv = FSET1(p);                                                                       \
  for (; d + FLANES <= hs; d += FLANES) {                                                   \
    ahead(vt + d, FLANES * (int)sizeof(*vt));                                               \
    FSTORE(out + d, FFMA(FLOAD_f32(out + d), pv, VLOAD(vt + d)));                           \
  }
#else
#define VALUES(VLOAD)
#endif
#define ATTEND(T, TYPE, VLOAD, LOAD)                                                         \
  static void attend_##T(const float *q, const TYPE *k, const TYPE *v, int64_t L, int64_t hs, \
                         float scale, float *scores, float *out) {                          \
    float top = -INFINITY, total = 0.f;                                                     \
    for (int64_t t = 0; t < L; t++) {                                                       \
      scores[t] = dot1_##T(k + t * hs, q, hs) * scale;                                      \
      top = scores[t] > top ? scores[t] : top;                                              \
    }                                                                                       \
    for (int64_t t = 0; t < L; t++) scores[t] = exp_approx(scores[t] - top);                \
    for (int64_t t = 0; t < L; t++) total += scores[t];                                     \
    for (int64_t d = 0; d < hs; d++) out[d] = 0.f;                                          \
    for (int64_t t = 0; t < L; t++) {                                                       \
      float p = scores[t] / total;                                                          \
      const TYPE *vt = v + t * hs;                                                          \
      int64_t d = 0;                                                                        \
      VALUES(VLOAD)                                                                         \
      for (; d < hs; d++) out[d] = MADD(p, LOAD(vt[d]), out[d]);                            \
    }                                                                                       \
  }
ATTEND(f32, float, FLOAD_f32, from_f32)
ATTEND(f16, uint16_t, HLOAD, from_f16)

/* x (n) as the C blocks write keys and values into an fp16 cache (tests/test_native.py holds
   every build to torch's conversion) */
int gptcli_f16(const float *x, int64_t n, uint16_t *out) {
  for (int64_t i = 0; i < n; i++) out[i] = to_f16(x[i]);
  return 0;
}

/* x (R * T, C): R rows of T new positions each, from pos on (a decode step: T = 1; checking a
   draft's T - 1 tokens: more), updated in place; each position attends to the cache and to
   the row's positions before it. kc, vc: row 0's cache (n_head, max_len, hs) of this layer, the
   next row's row_stride floats on. Returns 0, -1 out of memory, -2 a bad kind.

   The whole block is one parallel region: one thread prepares what every thread needs next
   (norms, the activations rounded for the integer products: SINGLE, which the others wait
   for), each thread takes its share of a product's output rows and what follows from them
   alone (the residual sum, GELU), and attention is shared out by (position, head). */
int gptcli_block(const gptcli_block_weights *b, float *x, int64_t R, int64_t T, int64_t C,
                 int64_t n_head, int64_t pos, void *kc, void *vc, int64_t row_stride,
                 int64_t max_len, int kv, int threads) {
  const gptcli_linear *qkv_l = &b->qkv, *proj = &b->proj, *fc = &b->fc, *out = &b->out;
  const gptcli_linear *all[4] = {qkv_l, proj, fc, out};
  for (int i = 0; i < 4; i++)
    if (all[i]->kind < 0 || all[i]->kind > 3) return -2;
  if (kv < 0 || kv > 2) return -2;
  int64_t hs = C / n_head, L = pos + T, F = fc->N, M = R * T;
  float *h = malloc(sizeof(float) * M * C), *qkv = malloc(sizeof(float) * M * 3 * C);
  float *att = malloc(sizeof(float) * M * C), *f = malloc(sizeof(float) * M * F);
  float *scores = malloc(sizeof(float) * M * n_head * L);
  acts a;
  int rc = acts_new(&a, M, F > C ? F : C);
  if (!h || !qkv || !att || !f || !scores || rc) { rc = -1; goto done; }
  float scale = 1.f / sqrtf((float)hs);
  PARALLEL
  {
    SINGLE
    {
      for (int64_t m = 0; m < M; m++)
        layer_norm(x + m * C, C, b->ln1_w, b->ln1_b, b->eps, h + m * C);
      prepare(qkv_l, h, M, &a);
    }
    {
      SHARE(3 * C, n0, n1);
      rows(qkv_l, h, &a, M, qkv, n0, n1);
    }
    BARRIER
    FOR
    for (int64_t i = 0; i < M * n_head; i++) { /* position m = (row, t) of head j: its k, v */
      int64_t m = i / n_head, j = i % n_head;
      int64_t at = (m / T) * row_stride + j * max_len * hs + (pos + m % T) * hs;
      const float *kx = qkv + m * 3 * C + C + j * hs, *vx = kx + C;
      if (kv == 2)
        for (int64_t d = 0; d < hs; d++) {
          ((uint16_t *)kc)[at + d] = to_f16(kx[d]);
          ((uint16_t *)vc)[at + d] = to_f16(vx[d]);
        }
      else
        for (int64_t d = 0; d < hs; d++) {
          ((float *)kc)[at + d] = kv ? from_f16(to_f16(kx[d])) : kx[d];
          ((float *)vc)[at + d] = kv ? from_f16(to_f16(vx[d])) : vx[d];
        }
    }
    FOR
    for (int64_t i = 0; i < M * n_head; i++) { /* position m's head j attends */
      int64_t m = i / n_head, j = i % n_head, at = (m / T) * row_stride + j * max_len * hs;
      if (kv == 2)
        attend_f16(qkv + m * 3 * C + j * hs, (const uint16_t *)kc + at, (const uint16_t *)vc + at,
                   pos + m % T + 1, hs, scale, scores + i * L, att + m * C + j * hs);
      else
        attend_f32(qkv + m * 3 * C + j * hs, (const float *)kc + at, (const float *)vc + at,
                   pos + m % T + 1, hs, scale, scores + i * L, att + m * C + j * hs);
    }
    SINGLE
    prepare(proj, att, M, &a);
    add_rows(proj, att, &a, M, h, x);
    BARRIER
    SINGLE
    {
      for (int64_t m = 0; m < M; m++)
        layer_norm(x + m * C, C, b->ln2_w, b->ln2_b, b->eps, h + m * C);
      prepare(fc, h, M, &a);
    }
    {
      SHARE(F, n0, n1);
      rows(fc, h, &a, M, f, n0, n1);
      for (int64_t m = 0; m < M; m++) gelu_tanh(f + m * F + n0, n1 - n0);
    }
    BARRIER
    SINGLE
    prepare(out, f, M, &a);
    add_rows(out, f, &a, M, h, x);
  }
done:
  free(h); free(qkv); free(att); free(f); free(scores); acts_free(&a);
  return rc;
}

/* A whole decode step in one call (native_step.py): the n blocks in turn (block i with its own
   cache, kc[i] and vc[i]), then, where head is given, the final layer norm and the output
   product, of each row's last position (last_only) or of every position, into logits. From
   Python that is one call a token where it was one a block and three for the head; each costs
   more than its work here, since streaming the weights leaves Python's code and data cold. */
int gptcli_step(const gptcli_block_weights *b, int64_t n, float *x, int64_t R, int64_t T,
                int64_t C, int64_t n_head, int64_t pos, void *const *kc, void *const *vc,
                int64_t row_stride, int64_t max_len, int kv, const float *lnf_w, const float *lnf_b,
                float eps, const gptcli_linear *head, int64_t last_only, float *logits,
                int threads) {
  for (int64_t i = 0; i < n; i++) {
    int rc = gptcli_block(b + i, x, R, T, C, n_head, pos, kc[i], vc[i], row_stride, max_len,
                          kv, threads);
    if (rc) return rc;
  }
  if (!head) return 0;
  if (head->kind < 0 || head->kind > 3 || head->K != C) return -2;
  int64_t M = last_only ? R : R * T;
  float *h = malloc(sizeof(float) * M * C);
  acts a;
  int rc = acts_new(&a, M, C);
  if (!h || rc) { rc = -1; goto done; }
  for (int64_t m = 0; m < M; m++)
    layer_norm(x + (last_only ? m * T + T - 1 : m) * C, C, lnf_w, lnf_b, eps, h + m * C);
  prepare(head, h, M, &a);
  PARALLEL
  {
    SHARE(head->N, n0, n1);
    rows(head, h, &a, M, logits, n0, n1);
  }
done:
  free(h); acts_free(&a);
  return rc;
}

/* out[b] = the index of row b's largest value, the first of equal ones, for x (B, V), rows
   stride floats apart: a greedy pick (sampling.py) in one call. Returns 1, leaving the rest to
   the caller, where a row holds a NaN or its largest value is not finite. */
int gptcli_argmax(const float *x, int64_t B, int64_t V, int64_t stride, int64_t *out) {
  for (int64_t b = 0; b < B; b++) {
    const float *p = x + b * stride;
    float m = -INFINITY;
    int nan = 0;
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 mv = _mm512_set1_ps(-INFINITY);
    __mmask16 un = 0;
    for (; k + 16 <= V; k += 16) {
      __m512 v = _mm512_loadu_ps(p + k);
      un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      mv = _mm512_max_ps(mv, v);
    }
    nan = un != 0;
    m = _mm512_reduce_max_ps(mv);
#endif
    for (; k < V; k++) {
      nan |= p[k] != p[k];
      m = p[k] > m ? p[k] : m;
    }
    if (nan || !isfinite(m)) return 1;
    k = 0;
#if defined(__AVX512F__)
    __m512 target = _mm512_set1_ps(m);
    for (; k + 16 <= V; k += 16) {
      __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + k), target, _CMP_EQ_OQ);
      if (hit) { k += __builtin_ctz(hit); break; }
    }
#endif
    while (p[k] != m) k++;
    out[b] = k;
  }
  return 0;
}
