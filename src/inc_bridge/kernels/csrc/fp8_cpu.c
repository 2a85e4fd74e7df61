/*
 * Native CPU kernels for inc_bridge's "cpu" backend (see docs/kernels.md).
 *
 * Built by `make kernels` (part of `make venv`/`make test`) into
 * src/inc_bridge/kernels/libinc_bridge_fp8.so with `-O3 -march=native -ffp-contract=off -fopenmp`,
 * and loaded with ctypes by kernels/cpu.py. No torch headers: it compiles in about a second and
 * depends on libc, pthreads and (with -fopenmp) libgomp, torch's own once loaded: see parallel_for.
 *
 * Four kinds of kernel:
 *   - ib_quantize / ib_quantize_rows / ib_qdq / ib_dequant: FP8 conversions that reproduce torch's
 *     CPU results bit for bit (the rounding code is c10's fp8e4m3fn/fp8e5m2_from_fp32_value and BFloat16's
 *     round-to-nearest-even, written without branches so the compiler vectorises it; qdq also has
 *     an AVX512 version, and dequantizing with one scale is a table lookup). torch's eager FP8
 *     casts run about one element per 5 ns here; these take 0.06-0.5 ns.
 *   - ib_add_bias: the exact path's bias add, torch's ``y.add_(bias)`` bit for bit.
 *   - ib_clip_errors: the error of each candidate clip over a histogram (the MSE clip search),
 *     the same bits as its torch version.
 *   - ib_fp8_gemv / ib_fp8_linear: y[m, n] = sum_k x[m, k] * w[n, k] for FP8 x and w (decode and
 *     prefill shapes), accumulated in fp32; ib_fp8_linear also quantizes x and writes the layer's
 *     scaled, rounded output with its bias. With AVX512-BF16 it decodes FP8 to bf16 through a 128-entry table
 *     (exact: every e4m3/e5m2 value is a bf16 value) and multiplies with vdpbf16ps; otherwise a
 *     plain C loop does the same math in fp32. Products of two FP8 values are exact in fp32, so
 *     only the order of the fp32 sums differs from a float matmul.
 *
 * Every kernel takes `nthreads` and runs its outer loop on that many threads, which take chunks
 * dynamically (the caller passes torch.get_num_threads()).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* a * b + c stays two roundings, as torch computes it (ib_clip_errors matches torch bit for bit
 * only so); here as well as in the Makefile's flags, which a CFLAGS override could drop. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define IB_AVX512BF16 1
#else
#define IB_AVX512BF16 0
#endif

enum { IB_F32 = 0, IB_BF16 = 1 };
enum { IB_E4M3 = 0, IB_E5M2 = 1 };

/* ------------------------------------------------------------------ bit helpers */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* c10::detail::fp8e4m3fn_from_fp32_value, branch-free. */
static inline uint8_t fp8_e4m3_from_f32(float f) {
  const uint32_t fp8_max = UINT32_C(1087) << 20, denorm_mask = UINT32_C(141) << 23;
  uint32_t bits = f2u(f);
  const uint32_t sign = bits & UINT32_C(0x80000000);
  bits ^= sign;
  /* below 2^-6: add a magic number so the FPU rounds to the denormal grid */
  uint32_t den = f2u(u2f(bits) + u2f(denorm_mask)) - denorm_mask;
  uint32_t nrm = (bits + (((uint32_t)(7 - 127) << 23) + 0x7FFFF) + ((bits >> 20) & 1)) >> 20;
  nrm = (nrm & 0xFF) == 0x7F ? 0x7E : nrm; /* rounding into the NaN pattern saturates */
  uint32_t big = bits > UINT32_C(0x7F800000) ? 0x7F : 0x7E;
  uint32_t r = bits >= fp8_max ? big : (bits < (UINT32_C(121) << 23) ? den : nrm);
  return (uint8_t)((r & 0xFF) | (sign >> 24));
}

/* c10::detail::fp8e5m2_from_fp32_value, branch-free. */
static inline uint8_t fp8_e5m2_from_f32(float f) {
  const uint32_t fp32_inf = UINT32_C(255) << 23, fp8_max = UINT32_C(143) << 23;
  const uint32_t denorm_mask = UINT32_C(134) << 23;
  uint32_t bits = f2u(f);
  const uint32_t sign = bits & UINT32_C(0x80000000);
  bits ^= sign;
  uint32_t den = f2u(u2f(bits) + u2f(denorm_mask)) - denorm_mask;
  uint32_t nrm = (bits + (((uint32_t)(15 - 127) << 23) + 0xFFFFF) + ((bits >> 21) & 1)) >> 21;
  uint32_t big = bits > fp32_inf ? 0x7F : 0x7C;
  uint32_t r = bits >= fp8_max ? big : (bits < (UINT32_C(113) << 23) ? den : nrm);
  return (uint8_t)((r & 0xFF) | (sign >> 24));
}

/* FP8 → fp32, exact, without passing through fp32 denormals (so it is right under DAZ too). */
static inline float f32_from_e4m3(uint8_t q) {
  uint32_t u = q, sign = (u & 0x80) << 24, e = (u >> 3) & 0xF, m = u & 7;
  uint32_t nrm = sign | ((e + 120) << 23) | (m << 20);
  uint32_t den = sign | f2u((float)m * 0x1p-9f);
  uint32_t r = e ? nrm : den;
  return u2f((u & 0x7F) == 0x7F ? (sign | UINT32_C(0x7FC00000)) : r);
}

static inline float f32_from_e5m2(uint8_t q) {
  uint32_t u = q, sign = (u & 0x80) << 24, e = (u >> 2) & 0x1F, m = u & 3;
  uint32_t nrm = sign | ((e + 112) << 23) | (m << 21);
  uint32_t den = sign | f2u((float)m * 0x1p-16f);
  uint32_t special = sign | UINT32_C(0x7F800000) | (m << 21); /* inf (m == 0) or NaN */
  return u2f(e == 31 ? special : (e ? nrm : den));
}

/* c10::BFloat16 round-to-nearest-even (NaN handled by the caller's comparisons, see qdq). */
static inline uint16_t bf16_from_f32(float f) {
  uint32_t u = f2u(f);
  uint16_t r = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  return f != f ? (uint16_t)0x7FC0 : r;
}

static inline float load_hp(const void* p, int dt, int64_t i) {
  if (dt == IB_BF16) return u2f((uint32_t)((const uint16_t*)p)[i] << 16);
  return ((const float*)p)[i];
}

/* ------------------------------------------------------------------ threads */

typedef void (*range_fn)(void* ctx, int64_t begin, int64_t end);

/* Two ways to run a kernel's chunks on several threads, chosen at run time by ib_set_openmp:
 *
 * - pthreads of our own (the default in a build without OpenMP), created per call; they take chunks of `grain` items from a
 *   shared counter until none are left, so a thread that is descheduled (shared cores) loses its
 *   share to the others.
 * - torch's OpenMP workers (the default in a build with -fopenmp, which the Makefile uses): the library
 *   then needs libgomp.so.1, and the dynamic loader binds that to the libgomp torch already loaded
 *   (same soname; torch is always imported first). Those workers are still spinning right after a
 *   torch op, so they pick our chunks up at once, where our own threads must be created and then
 *   fight the spinning workers for the cores. But an OpenMP region ends at a barrier that every
 *   worker must reach: on an oversubscribed machine a worker that is not scheduled stalls each call
 *   (measured on 2 cores at load 10: a decode step 2.4x slower than with our own threads). */
#if defined(_OPENMP)
static int use_openmp = 1; /* the default: on a quiet 2-core machine, decode 1.50-1.54x bf16 vs 0.85x (docs/benchmarks.md) */
#else
static int use_openmp = 0;
#endif

/* 1: run kernels on torch's OpenMP workers (where the library was built with OpenMP); 0: on
 * threads of our own. Returns whether OpenMP is in use after the call. */
int ib_set_openmp(int on) {
#if defined(_OPENMP)
  use_openmp = on != 0;
#else
  (void)on;
#endif
  return use_openmp;
}

typedef struct {
  range_fn fn;
  void* ctx;
  int64_t n, grain, chunks;
  int64_t next; /* next chunk to hand out (atomic) */
} pool_t;

static void* worker(void* arg) {
  pool_t* p = (pool_t*)arg;
  for (;;) {
    int64_t c = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
    if (c >= p->chunks) break;
    int64_t b = c * p->grain, e = b + p->grain < p->n ? b + p->grain : p->n;
    p->fn(p->ctx, b, e);
  }
  return NULL;
}

/* Run fn over [0, n) in chunks of `grain` on up to nthreads threads (the caller is one of them). */
static void parallel_for(range_fn fn, void* ctx, int64_t n, int64_t grain, int nthreads) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  pool_t pool = {fn, ctx, n, grain, (n + grain - 1) / grain, 0};
  if (nthreads > 64) nthreads = 64;
  if (nthreads > pool.chunks) nthreads = (int)pool.chunks;
  if (nthreads <= 1) { fn(ctx, 0, n); return; }
#if defined(_OPENMP)
  if (use_openmp) {
    const int64_t chunks = pool.chunks;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++) {
      const int64_t b = c * grain, e = b + grain < n ? b + grain : n;
      fn(ctx, b, e);
    }
    return;
  }
#endif
  pthread_t tid[64];
  int started[64] = {0};
  for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tid[t], NULL, worker, &pool) == 0;
  worker(&pool); /* threads that failed to start are simply not there: the rest take their chunks */
  for (int t = 1; t < nthreads; t++)
    if (started[t]) pthread_join(tid[t], NULL);
}

/* Threads of our own pay off only for large conversions: right after a torch op, torch's OpenMP
 * workers still spin on the other cores, and a small job split across threads runs many times
 * slower than on one (measured on 2 cores after a GEMM: qdq of 36864 values 0.014 ms on one thread,
 * 0.54 ms on two; dequantizing a 384 x 384 weight 0.08 ms vs 0.89 ms). So each thread gets at least
 * `min_per_thread` elements. */
static int threads_for(int64_t elems, int nthreads, int64_t min_per_thread) {
  if (use_openmp) min_per_thread /= 8; /* torch's spinning OpenMP workers take a chunk at once */
  int64_t useful = elems / min_per_thread;
  if (useful < 1) useful = 1;
  return nthreads < useful ? nthreads : (int)useful;
}
#define ELEMWISE_MIN_PER_THREAD (INT64_C(1) << 18) /* quantize, qdq: ~0.5 ns per element */
#define DEQUANT_MIN_PER_THREAD (INT64_C(1) << 21)  /* dequant: ~0.25 ns per element */

/* ------------------------------------------------------------------ elementwise: quantize, qdq */

typedef struct {
  const void* x;
  int in_dt;
  float scale, fp8_max;
  int fmt;
  uint8_t* q;     /* quantize: FP8 bytes out */
  void* out;      /* qdq: high-precision out */
  int out_dt;
} elem_ctx;

static inline float clamp_div(float x, float scale, float fp8_max) {
  float t = x / scale;                                              /* torch: x.to(float32) / scale */
  return t != t ? t : (t < -fp8_max ? -fp8_max : (t > fp8_max ? fp8_max : t)); /* clamp, NaN kept */
}

static inline uint8_t quant_one(float x, float scale, float fp8_max, int fmt) {
  float t = clamp_div(x, scale, fp8_max);
  return fmt == IB_E4M3 ? fp8_e4m3_from_f32(t) : fp8_e5m2_from_f32(t);
}

/* The loops copy every field into locals and use restrict pointers: a store through a uint8_t
 * pointer may alias anything, and the compiler would otherwise reload the fields on each element
 * and refuse to vectorise. */
static __attribute__((unused)) void quantize_range(void* p, int64_t b, int64_t e) { /* the portable build's */
  const elem_ctx* c = (const elem_ctx*)p;
  const float scale = c->scale, fp8_max = c->fp8_max;
  uint8_t* restrict q = c->q;
  if (c->in_dt == IB_BF16 && c->fmt == IB_E4M3) {
    const uint16_t* restrict x = (const uint16_t*)c->x;
    for (int64_t i = b; i < e; i++) q[i] = quant_one(u2f((uint32_t)x[i] << 16), scale, fp8_max, IB_E4M3);
  } else if (c->in_dt == IB_F32 && c->fmt == IB_E4M3) {
    const float* restrict x = (const float*)c->x;
    for (int64_t i = b; i < e; i++) q[i] = quant_one(x[i], scale, fp8_max, IB_E4M3);
  } else {
    const int in_dt = c->in_dt, fmt = c->fmt;
    for (int64_t i = b; i < e; i++) q[i] = quant_one(load_hp(c->x, in_dt, i), scale, fp8_max, fmt);
  }
}

/* The FP8 value clamp(x / scale) rounds to, as fp32, without building the byte: c10's rounding
 * (magic-number add on the denormal grid, round-to-nearest-even on the mantissa bits otherwise)
 * done in the float domain. Valid for |t| <= the format's max, which the clamp guarantees; NaN
 * stays NaN. Equal to decode(fp8_from_f32(t)), as the tests check over every bf16 input. */
static inline float round_e4m3(float t) {
  uint32_t bits = f2u(t), sign = bits & UINT32_C(0x80000000), a = bits ^ sign;
  uint32_t den = f2u((u2f(a) + 0x1p14f) - 0x1p14f);            /* grid 2^-9 below 2^-6 */
  uint32_t nrm = (a + 0x7FFFF + ((a >> 20) & 1)) & UINT32_C(0xFFF00000); /* 3 mantissa bits */
  uint32_t r = a < (UINT32_C(121) << 23) ? den : nrm;
  return u2f((a > UINT32_C(0x7F800000) ? a : r) | sign);
}

static inline float round_e5m2(float t) {
  uint32_t bits = f2u(t), sign = bits & UINT32_C(0x80000000), a = bits ^ sign;
  uint32_t den = f2u((u2f(a) + 0x1p7f) - 0x1p7f);              /* grid 2^-16 below 2^-14 */
  uint32_t nrm = (a + 0xFFFFF + ((a >> 21) & 1)) & UINT32_C(0xFFE00000); /* 2 mantissa bits */
  uint32_t r = a < (UINT32_C(113) << 23) ? den : nrm;
  return u2f((a > UINT32_C(0x7F800000) ? a : r) | sign);
}

#define QDQ_LOOP(LOAD, ROUND, STORE)                                      \
  for (int64_t i = b; i < e; i++) {                                       \
    float v = ROUND(clamp_div(LOAD, scale, fp8_max)) * scale;             \
    STORE;                                                                \
  }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define IB_AVX512_QDQ 1
/* The same computation as QDQ_LOOP with round_e4m3 / round_e5m2 and bf16_from_f32, 16 lanes at a
 * time; the compiler's own vectorisation of the scalar code runs about 2.5x slower. */
static inline __m512 load16(const void* x, int dt, int64_t i, __mmask16 m) {
  if (dt == IB_BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t*)x + i)), 16));
  return _mm512_maskz_loadu_ps(m, (const float*)x + i);
}

static inline void store16(void* out, int dt, int64_t i, __mmask16 m, __m512 v) {
  if (dt != IB_BF16) { _mm512_mask_storeu_ps((float*)out + i, m, v); return; }
#if defined(__AVX512BF16__)
  /* vcvtneps2bf16 rounds to nearest even like c10 but flushes fp32 denormals to zero and keeps a
   * NaN's sign: NaN lanes are fixed up here, and a vector holding a denormal (a scale below 2^-117)
   * takes the integer path below. */
  const __m512 mag = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)));
  const __mmask16 tiny = _mm512_cmp_ps_mask(mag, _mm512_set1_ps(0x1p-126f), _CMP_LT_OQ) &
                         _mm512_cmp_ps_mask(mag, _mm512_setzero_ps(), _CMP_NEQ_OQ);
  if (!tiny) {
    __m256i r = (__m256i)_mm512_cvtneps_pbh(v);
    r = _mm256_mask_mov_epi16(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm256_set1_epi16(0x7FC0));
    _mm256_mask_storeu_epi16((uint16_t*)out + i, m, r);
    return;
  }
#endif
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16((uint16_t*)out + i, m, _mm512_cvtepi32_epi16(r));
}

/* The low / high 16 of 32 bf16 values as fp32. */
static inline __m512 bf16_lo16(__m512i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
}

static inline __m512 bf16_hi16(__m512i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}

#if defined(__AVX512BF16__)
/* store16 for 32 values (lo, then hi) that hold no fp32 denormal, which vcvtne2ps2bf16 would
 * flush: one conversion for both halves; NaN lanes become 0x7FC0 as c10 writes them. */
static inline void store32_bf16(uint16_t* out, __m512 lo, __m512 hi) {
  const __mmask32 nan = _mm512_kunpackw(_mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q), _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q));
  _mm512_storeu_si512(out, _mm512_mask_mov_epi16((__m512i)_mm512_cvtne2ps_pbh(hi, lo), nan, _mm512_set1_epi16(0x7FC0)));
}
#endif

/* The FP8 value round(clamp(x / s, ±fp8_max)) as fp32, 16 lanes: round_e4m3 / round_e5m2 vectorised. */
/* The FP8 value round(clamp(x / s, ±fp8_max)) as fp32, 16 lanes: round_e4m3 / round_e5m2 done by
 * the FPU. Adding c = 2^(E + 20), E the exponent of |t| (at least -6, the e4m3 denormal grid),
 * leaves |t|'s bits below 2^(E - 3) to the addition's round-to-nearest-even; subtracting c again is
 * exact. So |t| ends with 3 mantissa bits (e4m3; 2^(E + 21) and 2 bits for e5m2), as c10's
 * integer rounding gives (the tests compare every bf16 input). NaN is kept as it is. */
typedef struct {
  __m512 s, hi, lo;
  __m512i emin, cadd, abs_mask, inf;
} qround_t;

static inline qround_t qround_init(float scale, float fp8_max, int fmt) {
  const int e4 = fmt == IB_E4M3;
  qround_t r;
  r.s = _mm512_set1_ps(scale); r.hi = _mm512_set1_ps(fp8_max); r.lo = _mm512_set1_ps(-fp8_max);
  r.emin = _mm512_set1_epi32(e4 ? (121 << 23) : (113 << 23)); /* 2^-6, 2^-14: the smallest normal */
  r.cadd = _mm512_set1_epi32(e4 ? (20 << 23) : (21 << 23));
  r.abs_mask = _mm512_set1_epi32(0x7FFFFFFF); r.inf = _mm512_set1_epi32(0x7F800000);
  return r;
}

static inline __m512 qround16(const qround_t* q, __m512 x) {
  __m512 t = _mm512_div_ps(x, q->s);
  t = _mm512_min_ps(q->hi, _mm512_max_ps(q->lo, t)); /* x86 max/min return the 2nd operand on NaN: kept */
  const __m512i u = _mm512_castps_si512(t);
  const __m512i a = _mm512_and_si512(u, q->abs_mask), sign = _mm512_andnot_si512(q->abs_mask, u);
  const __m512i e = _mm512_max_epu32(_mm512_and_si512(a, q->inf), q->emin);
  const __m512 c = _mm512_castsi512_ps(_mm512_add_epi32(e, q->cadd));
  __m512i r = _mm512_castps_si512(_mm512_sub_ps(_mm512_add_ps(_mm512_castsi512_ps(a), c), c));
  r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epu32_mask(a, q->inf), a);
  return _mm512_castsi512_ps(_mm512_or_si512(r, sign));
}

/* FP8 bytes of values qround16 returned (exact FP8 values, NaN allowed). */
static inline __m128i fp8_bytes16(__m512 r, int fmt) {
  const __m512i u = _mm512_castps_si512(r);
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i sign = _mm512_srli_epi32(_mm512_andnot_si512(_mm512_set1_epi32(0x7FFFFFFF), u), 24);
  const int e4 = fmt == IB_E4M3;
  /* normal: exponent rebiased, top mantissa bits; denormal: the value in units of the smallest step */
  const __m512i nrm = _mm512_sub_epi32(_mm512_srli_epi32(a, e4 ? 20 : 21), _mm512_set1_epi32(e4 ? (120 << 3) : (112 << 2)));
  const __m512i den = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(e4 ? 0x1p9f : 0x1p16f)));
  __m512i b = _mm512_mask_mov_epi32(nrm, _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(e4 ? (121 << 23) : (113 << 23))), den);
  b = _mm512_mask_mov_epi32(b, _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F800000)),
                            _mm512_set1_epi32(e4 ? 0x7F : 0x7F)); /* NaN: c10 writes 0x7F for both formats */
  return _mm512_cvtepi32_epi8(_mm512_or_si512(b, sign));
}

/* fp8_bytes16 in fewer instructions: r * 2^-(127 - bias) moves an FP8 value's exponent into the
 * fp32 exponent field unchanged (a normal) or makes it the fp32 denormal whose top mantissa bits are
 * the FP8 denormal's, so the byte is the bits above the dropped mantissa, plus the sign. Exact
 * (a power-of-two scaling), unless the thread flushes denormals to zero (MXCSR.FTZ, as
 * torch.set_flush_denormal(True) sets): the caller checks that. */
static inline __m128i fp8_bytes16_scaled(__m512 r, int fmt) {
  const int e4 = fmt == IB_E4M3;
  const __m512i u = _mm512_castps_si512(_mm512_mul_ps(r, _mm512_set1_ps(e4 ? 0x1p-120f : 0x1p-112f)));
  /* (bits >> 20 or 21) & 0x7F | sign >> 24: vpternlogd's "C ? A : B" */
  __m512i b = _mm512_ternarylogic_epi32(_mm512_srli_epi32(u, e4 ? 20 : 21), _mm512_srli_epi32(u, 24),
                                        _mm512_set1_epi32(0x7F), 0xE4);
  b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q), _mm512_set1_epi32(0x7F)); /* NaN: 0x7F */
  return _mm512_cvtepi32_epi8(b);
}

static void quantize_range_avx512(const elem_ctx* c, int64_t b, int64_t e) {
  const qround_t q = qround_init(c->scale, c->fp8_max, c->fmt);
  int64_t i = b;
  if (c->in_dt == IB_BF16 && !(_mm_getcsr() & 0x8000)) { /* bf16 in, 32 values a step */
    const uint16_t* restrict x = (const uint16_t*)c->x;
    for (; i + 32 <= e; i += 32) {
      const __m512i v = _mm512_loadu_si512(x + i);
      const __m512 lo = bf16_lo16(v), hi = bf16_hi16(v);
      _mm_storeu_si128((__m128i*)(c->q + i), fp8_bytes16_scaled(qround16(&q, lo), c->fmt));
      _mm_storeu_si128((__m128i*)(c->q + i + 16), fp8_bytes16_scaled(qround16(&q, hi), c->fmt));
    }
  }
  for (; i < e; i += 16) {
    const __mmask16 m = e - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (e - i)) - 1);
    _mm_mask_storeu_epi8(c->q + i, m, fp8_bytes16(qround16(&q, load16(c->x, c->in_dt, i, m)), c->fmt));
  }
}

static void qdq_range_avx512(const elem_ctx* c, int64_t b, int64_t e) {
  const qround_t q = qround_init(c->scale, c->fp8_max, c->fmt);
  int64_t i = b;
#if defined(__AVX512BF16__)
  /* bf16 to bf16 (the common case), 32 values a step: one vcvtne2ps2bf16 for both halves. With a
   * scale of at least 2^-100 no output is an fp32 denormal (the smallest FP8 step is 2^-16), so
   * store16's denormal test is not needed; NaN lanes still become 0x7FC0 as c10 writes them. */
  if (c->in_dt == IB_BF16 && c->out_dt == IB_BF16 && c->scale >= 0x1p-100f) {
    const uint16_t* restrict x = (const uint16_t*)c->x;
    uint16_t* restrict out = (uint16_t*)c->out;
    for (; i + 32 <= e; i += 32) {
      const __m512i v = _mm512_loadu_si512(x + i);
      const __m512 lo = bf16_lo16(v), hi = bf16_hi16(v);
      store32_bf16(out + i, _mm512_mul_ps(qround16(&q, lo), q.s), _mm512_mul_ps(qround16(&q, hi), q.s));
    }
  }
#endif
  for (; i < e; i += 16) {
    const __mmask16 m = e - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (e - i)) - 1);
    store16(c->out, c->out_dt, i, m, _mm512_mul_ps(qround16(&q, load16(c->x, c->in_dt, i, m)), q.s));
  }
}
#else
#define IB_AVX512_QDQ 0
#endif

static void qdq_range(void* p, int64_t b, int64_t e) {
  const elem_ctx* c = (const elem_ctx*)p;
#if IB_AVX512_QDQ
  qdq_range_avx512(c, b, e);
  return;
#endif
  const float scale = c->scale, fp8_max = c->fp8_max;
  const int in_dt = c->in_dt, out_dt = c->out_dt;
  const uint16_t* restrict xb = (const uint16_t*)c->x;
  const float* restrict xf = (const float*)c->x;
  uint16_t* restrict ob = (uint16_t*)c->out;
  float* restrict of = (float*)c->out;
  if (in_dt == IB_BF16 && out_dt == IB_BF16 && c->fmt == IB_E4M3) {
    QDQ_LOOP(u2f((uint32_t)xb[i] << 16), round_e4m3, ob[i] = bf16_from_f32(v))
  } else if (in_dt == IB_F32 && out_dt == IB_F32 && c->fmt == IB_E4M3) {
    QDQ_LOOP(xf[i], round_e4m3, of[i] = v)
  } else if (c->fmt == IB_E4M3) {
    QDQ_LOOP(load_hp(c->x, in_dt, i), round_e4m3, if (out_dt == IB_BF16) ob[i] = bf16_from_f32(v); else of[i] = v)
  } else if (in_dt == IB_BF16 && out_dt == IB_BF16) {
    QDQ_LOOP(u2f((uint32_t)xb[i] << 16), round_e5m2, ob[i] = bf16_from_f32(v))
  } else {
    QDQ_LOOP(load_hp(c->x, in_dt, i), round_e5m2, if (out_dt == IB_BF16) ob[i] = bf16_from_f32(v); else of[i] = v)
  }
}

/* FP8 bytes of clamp(x / scale, ±fp8_max): torch's quantize_fp8. */
static void quantize_any(void* p, int64_t b, int64_t e) {
#if IB_AVX512_QDQ
  quantize_range_avx512((const elem_ctx*)p, b, e);
#else
  quantize_range(p, b, e);
#endif
}

void ib_quantize(const void* x, int in_dt, int64_t n, float scale, float fp8_max, int fmt, uint8_t* q,
                 int nthreads) {
  elem_ctx c = {x, in_dt, scale, fp8_max, fmt, q, NULL, 0};
  parallel_for(quantize_any, &c, n, 1 << 14, threads_for(n, nthreads, ELEMWISE_MIN_PER_THREAD));
}

/* The same, one scale per row of a [rows, cols] x (per-channel weights): row r is quantized
 * exactly as ib_quantize would quantize it alone with scales[r]. */
typedef struct {
  const void* x;
  int in_dt;
  int64_t cols;
  const float* scales;
  float fp8_max;
  int fmt;
  uint8_t* q;
} rows_ctx;

static void quantize_rows_range(void* p, int64_t b, int64_t e) {
  const rows_ctx* r = (const rows_ctx*)p;
  const int64_t cols = r->cols;
  const size_t width = r->in_dt == IB_BF16 ? 2 : 4;
  for (int64_t row = b; row < e; row++) {
    elem_ctx c = {(const char*)r->x + (size_t)(row * cols) * width, r->in_dt, r->scales[row], r->fp8_max, r->fmt,
                  r->q + row * cols, NULL, 0};
    quantize_any(&c, 0, cols);
  }
}

void ib_quantize_rows(const void* x, int in_dt, int64_t rows, int64_t cols, const float* scales, float fp8_max,
                      int fmt, uint8_t* q, int nthreads) {
  rows_ctx c = {x, in_dt, cols, scales, fp8_max, fmt, q};
  int64_t grain = cols > 0 ? ((INT64_C(1) << 14) + cols - 1) / cols : rows;
  parallel_for(quantize_rows_range, &c, rows, grain, threads_for(rows * cols, nthreads, ELEMWISE_MIN_PER_THREAD));
}

/* dequantize(quantize(x)) in one pass: torch's quant_dequant, bit for bit. */
void ib_qdq(const void* x, int in_dt, int64_t n, float scale, float fp8_max, int fmt, void* out, int out_dt,
            int nthreads) {
  elem_ctx c = {x, in_dt, scale, fp8_max, fmt, NULL, out, out_dt};
  parallel_for(qdq_range, &c, n, 1 << 14, threads_for(n, nthreads, ELEMWISE_MIN_PER_THREAD));
}

/* ------------------------------------------------------------------ bias add */

/* y[r, j] += bias[j] in place for a contiguous [rows, n] y: torch's ``y.add_(bias)``, the same bits
 * (fp32 sum; bf16 rounds it to nearest even, fp32 denormal sums included, a NaN becomes 0x7FC0). */
typedef struct {
  void* y;
  int dt;
  int64_t n;
  const void* bias;
} bias_ctx;

static void add_bias_range(void* p, int64_t rb, int64_t re) {
  const bias_ctx* c = (const bias_ctx*)p;
  const int64_t n = c->n;
  if (c->dt != IB_BF16) {
    const float* restrict b = (const float*)c->bias;
    for (int64_t r = rb; r < re; r++) {
      float* restrict y = (float*)c->y + r * n;
      for (int64_t j = 0; j < n; j++) y[j] = y[j] + b[j];
    }
    return;
  }
  const uint16_t* restrict b = (const uint16_t*)c->bias;
  for (int64_t r = rb; r < re; r++) {
    uint16_t* restrict y = (uint16_t*)c->y + r * n;
    int64_t j = 0;
#if defined(__AVX512BF16__)
    for (; j + 32 <= n; j += 32) { /* 32 a step; a vector with an fp32 denormal sum takes store16's path */
      const __m512i yv = _mm512_loadu_si512(y + j), bv = _mm512_loadu_si512(b + j);
      const __m512 lo = _mm512_add_ps(bf16_lo16(yv), bf16_lo16(bv)), hi = _mm512_add_ps(bf16_hi16(yv), bf16_hi16(bv));
      const __m512 tiny = _mm512_set1_ps(0x1p-126f);
      const __mmask16 dl = _mm512_cmp_ps_mask(_mm512_abs_ps(lo), tiny, _CMP_LT_OQ) & _mm512_cmp_ps_mask(lo, _mm512_setzero_ps(), _CMP_NEQ_OQ);
      const __mmask16 dh = _mm512_cmp_ps_mask(_mm512_abs_ps(hi), tiny, _CMP_LT_OQ) & _mm512_cmp_ps_mask(hi, _mm512_setzero_ps(), _CMP_NEQ_OQ);
      if (dl | dh) {
        store16(y, IB_BF16, j, 0xFFFF, lo);
        store16(y, IB_BF16, j + 16, 0xFFFF, hi);
        continue;
      }
      store32_bf16(y + j, lo, hi);
    }
#endif
#if IB_AVX512_QDQ
    for (; j < n; j += 16) {
      const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
      store16(y, IB_BF16, j, m, _mm512_add_ps(load16(y, IB_BF16, j, m), load16(b, IB_BF16, j, m)));
    }
#endif
    for (; j < n; j++) y[j] = bf16_from_f32(u2f((uint32_t)y[j] << 16) + u2f((uint32_t)b[j] << 16));
  }
}

void ib_add_bias(void* y, int dt, int64_t rows, int64_t n, const void* bias, int nthreads) {
  bias_ctx c = {y, dt, n, bias};
  const int64_t grain = n > 0 ? ((INT64_C(1) << 14) + n - 1) / n : rows;
  parallel_for(add_bias_range, &c, rows, grain, threads_for(rows * n, nthreads, ELEMWISE_MIN_PER_THREAD));
}

/* ------------------------------------------------------------------ MSE clip search */

/* errors[i] = sum_j counts[j] * (fp8(min(c_j / scales[i], fp8_max)) * scales[i] - c_j)^2 over the
 * non-empty bins j of a histogram of n bins of `width`, c_j = (j + 0.5) * width the bin centre, for k
 * candidate scales: the squared error of quantizing the histogram with each candidate (scales.py's
 * MSE clip). Every operation is the one the torch version does, in the same order (division and
 * products in double, the FP8 rounding from float, the sum over bins in bin order, as torch.cumsum
 * takes it; empty bins add exact zeros there), so the errors are the same bits. That needs the
 * compiler to keep a * b + c as two roundings: the library is built with -ffp-contract=off. Bins
 * go in the outer loop so the candidates' sums are independent lanes the compiler vectorises. */
#define CLIP_ERRORS_LOOP(ROUND)                                                  \
  for (int64_t i = 0; i < k; i++) {                                              \
    double t = c / scales[i];                                                    \
    double d = (double)ROUND((float)(t > fp8_max ? fp8_max : t)) * scales[i] - c; \
    errors[i] += d * d * w;                                                      \
  }

void ib_clip_errors(const double* counts, int64_t n, double width, const double* scales, int64_t k, double fp8_max,
                    int fmt, double* restrict errors) {
  for (int64_t i = 0; i < k; i++) errors[i] = 0.0;
  for (int64_t j = 0; j < n; j++) {
    const double w = counts[j];
    if (w == 0.0) continue;
    const double c = ((double)j + 0.5) * width;
    if (fmt == IB_E4M3) {
      CLIP_ERRORS_LOOP(round_e4m3)
    } else {
      CLIP_ERRORS_LOOP(round_e5m2)
    }
  }
}

/* ------------------------------------------------------------------ FP8 → bf16 tables */

/* FP8 → bf16 is exact for both formats, and so is a table indexed by the 7 magnitude bits: the
 * sign is ORed in afterwards. Round-to-nearest-even is symmetric, so bf16(q * s) has the same
 * property, and a dequantization with one scale is a table lookup too. */
static uint16_t LUT_BF16[2][128]; /* |FP8| (7 bits) → bf16 bits, per format */
static pthread_once_t lut_once = PTHREAD_ONCE_INIT;

static void build_luts(void) {
  for (int i = 0; i < 128; i++) {
    LUT_BF16[IB_E4M3][i] = (uint16_t)(f2u(f32_from_e4m3((uint8_t)i)) >> 16);
    LUT_BF16[IB_E5M2][i] = (uint16_t)(f2u(f32_from_e5m2((uint8_t)i)) >> 16);
  }
}

static void scaled_lut_bf16(int fmt, float s, uint16_t* restrict lut) {
  for (int i = 0; i < 128; i++)
    lut[i] = bf16_from_f32((fmt == IB_E4M3 ? f32_from_e4m3((uint8_t)i) : f32_from_e5m2((uint8_t)i)) * s);
}

#if IB_AVX512BF16
/* 32 FP8 bytes → 32 bf16: a 128-entry table lookup (two vpermi2w) plus the sign bit. */
static inline __m512i decode32(const uint8_t* p, __mmask32 mask, __m512i t0, __m512i t1, __m512i t2, __m512i t3) {
  __m512i u = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, p));
  __m512i lo = _mm512_permutex2var_epi16(t0, u, t1);   /* index bits 0-5: entries 0..63 */
  __m512i hi = _mm512_permutex2var_epi16(t2, u, t3);   /* entries 64..127 */
  __mmask32 upper = _mm512_test_epi16_mask(u, _mm512_set1_epi16(0x40));
  __m512i mag = _mm512_mask_blend_epi16(upper, lo, hi);
  __m512i sign = _mm512_slli_epi16(_mm512_and_si512(u, _mm512_set1_epi16(0x80)), 8);
  return _mm512_or_si512(mag, sign);
}

static inline void lut_decode_bf16(const uint8_t* restrict q, int64_t n, const uint16_t* lut,
                                   uint16_t* restrict out) {
  __m512i t0 = _mm512_loadu_si512(lut), t1 = _mm512_loadu_si512(lut + 32);
  __m512i t2 = _mm512_loadu_si512(lut + 64), t3 = _mm512_loadu_si512(lut + 96);
  for (int64_t i = 0; i < n; i += 32) {
    __mmask32 mask = n - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (n - i)) - 1);
    _mm512_mask_storeu_epi16(out + i, mask, decode32(q + i, mask, t0, t1, t2, t3));
  }
}

/* 64 FP8 bytes → 64 bf16 in the GEMM's order: w0 holds k = 0-7, 16-23, 32-39, 48-55 of the chunk
 * and w1 the other 32 (the order of an in-lane byte interleave; the activations are packed in the
 * same order, so each product still meets its partner). With AVX512-VBMI one vpermi2b looks up
 * the high bytes of all 64 values in a 128-entry table and another the low bytes: 6 instructions
 * for 64 weights, where decode32 takes 8 for 32 (a decode step is bound by this, not by memory). */
typedef struct { __m512i hi0, hi1, lo0, lo1, t0, t1, t2, t3; } lut64_t;

static inline lut64_t lut64_init(int fmt) {
  const uint16_t* lut = LUT_BF16[fmt];
  uint8_t hi[128], lo[128];
  for (int i = 0; i < 128; i++) { hi[i] = (uint8_t)(lut[i] >> 8); lo[i] = (uint8_t)lut[i]; }
  lut64_t t;
  t.hi0 = _mm512_loadu_si512(hi); t.hi1 = _mm512_loadu_si512(hi + 64);
  t.lo0 = _mm512_loadu_si512(lo); t.lo1 = _mm512_loadu_si512(lo + 64);
  t.t0 = _mm512_loadu_si512(lut); t.t1 = _mm512_loadu_si512(lut + 32);
  t.t2 = _mm512_loadu_si512(lut + 64); t.t3 = _mm512_loadu_si512(lut + 96);
  return t;
}

static inline __attribute__((always_inline)) void decode64(const uint8_t* p, __mmask64 mask, const lut64_t* t,
                                                           __m512i* w0, __m512i* w1) {
#if defined(__AVX512VBMI__)
  const __m512i u = _mm512_maskz_loadu_epi8(mask, p);
  __m512i hi = _mm512_permutex2var_epi8(t->hi0, u, t->hi1); /* index bits 0-6; the sign bit is ignored */
  const __m512i lo = _mm512_permutex2var_epi8(t->lo0, u, t->lo1);
  hi = _mm512_ternarylogic_epi32(hi, u, _mm512_set1_epi8((char)0x80), 0xF8); /* hi | (u & 0x80): the sign */
  *w0 = _mm512_unpacklo_epi8(lo, hi);
  *w1 = _mm512_unpackhi_epi8(lo, hi);
#else /* AVX512-BF16 without VBMI (Cooper Lake): decode32 twice, then the same order */
  const __m512i a = decode32(p, (__mmask32)mask, t->t0, t->t1, t->t2, t->t3);
  const __m512i b = decode32(p + 32, (__mmask32)(mask >> 32), t->t0, t->t1, t->t2, t->t3);
  const __m512i i0 = _mm512_setr_epi32(0x00010000 | 0x00000000, 0x00030002, 0x00050004, 0x00070006, 0x00110010,
                                       0x00130012, 0x00150014, 0x00170016, 0x00210020, 0x00230022, 0x00250024,
                                       0x00270026, 0x00310030, 0x00330032, 0x00350034, 0x00370036);
  const __m512i i1 = _mm512_add_epi16(i0, _mm512_set1_epi16(8));
  *w0 = _mm512_permutex2var_epi16(a, i0, b);
  *w1 = _mm512_permutex2var_epi16(a, i1, b);
#endif
}
#else
static inline void lut_decode_bf16(const uint8_t* restrict q, int64_t n, const uint16_t* lut,
                                   uint16_t* restrict out) {
  for (int64_t i = 0; i < n; i++) out[i] = (uint16_t)(lut[q[i] & 0x7F] | ((q[i] & 0x80) << 8));
}
#endif

/* ------------------------------------------------------------------ weight dequantization */

typedef struct {
  const uint8_t* q;   /* [N, K] */
  int64_t N, K;
  const float* scale; /* 1 value, or N when per_row */
  int per_row, fmt;
  void* out;          /* [N, K], or [K, N] when transpose */
  int out_dt, transpose;
} deq_ctx;

#define DEQ_TILE 64

#if defined(__SSE2__)
#include <emmintrin.h>
/* 16 x 16 bytes: src rows (stride ss) become dst columns (stride ds). After four rounds of unpacks
 * register i holds source column bitrev4(i). */
static inline void transpose16_u8(const uint8_t* src, int64_t ss, uint8_t* dst, int64_t ds) {
  static const int bitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  __m128i r[16], t[16];
  for (int i = 0; i < 16; i++) r[i] = _mm_loadu_si128((const __m128i*)(src + i * ss));
  for (int i = 0; i < 8; i++) { t[i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]); t[i + 8] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]); }
  for (int i = 0; i < 8; i++) { r[i] = _mm_unpacklo_epi16(t[2 * i], t[2 * i + 1]); r[i + 8] = _mm_unpackhi_epi16(t[2 * i], t[2 * i + 1]); }
  for (int i = 0; i < 8; i++) { t[i] = _mm_unpacklo_epi32(r[2 * i], r[2 * i + 1]); t[i + 8] = _mm_unpackhi_epi32(r[2 * i], r[2 * i + 1]); }
  for (int i = 0; i < 8; i++) { r[i] = _mm_unpacklo_epi64(t[2 * i], t[2 * i + 1]); r[i + 8] = _mm_unpackhi_epi64(t[2 * i], t[2 * i + 1]); }
  for (int i = 0; i < 16; i++) _mm_storeu_si128((__m128i*)(dst + bitrev4[i] * ds), r[i]);
}
#endif

/* tile[j][i] = q[(n0 + i) * K + k0 + j] for an nt x kt block. */
static void transpose_tile(const uint8_t* q, int64_t K, int64_t n0, int64_t k0, int64_t nt, int64_t kt,
                           uint8_t tile[DEQ_TILE][DEQ_TILE]) {
  int64_t i = 0, j = 0;
#if defined(__SSE2__)
  for (i = 0; i + 16 <= nt; i += 16)
    for (j = 0; j + 16 <= kt; j += 16) transpose16_u8(q + (n0 + i) * K + k0 + j, K, &tile[j][i], DEQ_TILE);
  /* the loops above leave i, j at the ends of the full 16-blocks */
  const int64_t ni = nt / 16 * 16, kj = kt / 16 * 16;
  for (int64_t ii = 0; ii < nt; ii++)
    for (int64_t jj = (ii < ni ? kj : 0); jj < kt; jj++) tile[jj][ii] = q[(n0 + ii) * K + k0 + jj];
#else
  for (i = 0; i < nt; i++)
    for (j = 0; j < kt; j++) tile[j][i] = q[(n0 + i) * K + k0 + j];
#endif
}

static void dequant_range(void* p, int64_t nb, int64_t ne) {
  const deq_ctx* c = (const deq_ctx*)p;
  const int64_t K = c->K, N = c->N;
  const int fmt = c->fmt, out_dt = c->out_dt, per_row = c->per_row;
  uint16_t* ob = (uint16_t*)c->out;
  float* of = (float*)c->out;
  uint16_t lut[128];
  if (out_dt == IB_BF16 && !per_row) scaled_lut_bf16(fmt, c->scale[0], lut);
  if (!c->transpose) {
    for (int64_t n = nb; n < ne; n++) {
      const float s = c->scale[per_row ? n : 0];
      const uint8_t* restrict row = c->q + n * K;
      if (out_dt == IB_BF16) {
        if (per_row) scaled_lut_bf16(fmt, s, lut);
        lut_decode_bf16(row, K, lut, ob + n * K);
      } else {
        float* restrict o = of + n * K;
        if (fmt == IB_E4M3) for (int64_t k = 0; k < K; k++) o[k] = f32_from_e4m3(row[k]) * s;
        else for (int64_t k = 0; k < K; k++) o[k] = f32_from_e5m2(row[k]) * s;
      }
    }
    return;
  }
  /* [K, N] out: transpose a tile of FP8 bytes (1 byte each, cheap), then decode its rows
   * contiguously; with per-row scales the scale now changes along the row, so no table. */
  uint8_t tile[DEQ_TILE][DEQ_TILE];
  float srow[DEQ_TILE];
#if IB_AVX512BF16 && IB_AVX512_QDQ
  const uint16_t* ul = LUT_BF16[fmt];
  const __m512i lut32[4] = {_mm512_loadu_si512(ul), _mm512_loadu_si512(ul + 32), _mm512_loadu_si512(ul + 64),
                            _mm512_loadu_si512(ul + 96)};
#endif
  for (int64_t n0 = nb; n0 < ne; n0 += DEQ_TILE) {
    const int64_t nt = ne - n0 < DEQ_TILE ? ne - n0 : DEQ_TILE;
    for (int64_t i = 0; i < nt; i++) srow[i] = c->scale[per_row ? n0 + i : 0];
    for (int64_t k0 = 0; k0 < K; k0 += DEQ_TILE) {
      const int64_t kt = K - k0 < DEQ_TILE ? K - k0 : DEQ_TILE;
      transpose_tile(c->q, K, n0, k0, nt, kt, tile);
      for (int64_t j = 0; j < kt; j++) {
        const uint8_t* restrict t = tile[j];
        const float* restrict sr = srow;
        if (out_dt == IB_BF16 && !per_row) {
          lut_decode_bf16(t, nt, lut, ob + (k0 + j) * N + n0);
        } else if (out_dt == IB_BF16) {
          uint16_t* restrict o = ob + (k0 + j) * N + n0;
#if IB_AVX512BF16 && IB_AVX512_QDQ
          /* 32 a step: the values (exact in bf16) by decode32's table lookup, times their scales in
           * fp32, rounded as store16 rounds (c10's bf16, denormals and NaN included) */
          for (int64_t i = 0; i < nt; i += 32) {
            const __mmask32 m = nt - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (nt - i)) - 1);
            const __m512i v = decode32(t + i, m, lut32[0], lut32[1], lut32[2], lut32[3]);
            store16(o, IB_BF16, i, (__mmask16)m, _mm512_mul_ps(bf16_lo16(v), _mm512_maskz_loadu_ps((__mmask16)m, sr + i)));
            if (nt - i > 16)
              store16(o, IB_BF16, i + 16, (__mmask16)(m >> 16),
                      _mm512_mul_ps(bf16_hi16(v), _mm512_maskz_loadu_ps((__mmask16)(m >> 16), sr + i + 16)));
          }
          continue;
#endif
          if (fmt == IB_E4M3) for (int64_t i = 0; i < nt; i++) o[i] = bf16_from_f32(f32_from_e4m3(t[i]) * sr[i]);
          else for (int64_t i = 0; i < nt; i++) o[i] = bf16_from_f32(f32_from_e5m2(t[i]) * sr[i]);
        } else {
          float* restrict o = of + (k0 + j) * N + n0;
          if (fmt == IB_E4M3) for (int64_t i = 0; i < nt; i++) o[i] = f32_from_e4m3(t[i]) * sr[i];
          else for (int64_t i = 0; i < nt; i++) o[i] = f32_from_e5m2(t[i]) * sr[i];
        }
      }
    }
  }
}

/* (q.to(float32) * scale).to(out dtype), [N, K] → [N, K] or (transpose) [K, N]: torch's dequantize_fp8. */
void ib_dequant(const uint8_t* q, int64_t N, int64_t K, const float* scale, int per_row, int fmt, void* out,
                int out_dt, int transpose, int nthreads) {
  deq_ctx c = {q, N, K, scale, per_row, fmt, out, out_dt, transpose};
  pthread_once(&lut_once, build_luts);
  int64_t grain = (1 << 16) / (K > 0 ? K : 1);
  grain = grain < 1 ? 1 : grain;
  if (transpose) grain = (grain + DEQ_TILE - 1) / DEQ_TILE * DEQ_TILE;
  parallel_for(dequant_range, &c, N, grain, threads_for(N * K, nthreads, DEQUANT_MIN_PER_THREAD));
}

/* ------------------------------------------------------------------ FP8 x FP8 GEMV / GEMM */

/* y[m, n] = sum_k fp8(x[m, k]) * fp8(w[n, k]), summed in fp32. Products of two FP8 values are exact
 * in fp32, so only the order of the sums differs from a float matmul; that order is fixed: for each
 * (m, n), 16 fp32 lanes each sum a fixed share of every 64-wide chunk of k (the pairs decode64 puts
 * in their lane; vdpbf16ps adds a pair per lane), chunk after chunk, then the lanes are added up in
 * _mm512_reduce_add_ps's tree. It depends neither on the thread count nor on
 * how rows are blocked, so the GEMV (few rows, weights decoded in registers) and the GEMM (more
 * rows, each block of weight rows decoded once into a bf16 buffer that all activation rows reuse)
 * give the same bits for the same (m, n).
 *
 * The fused entry point (ib_fp8_linear) also quantizes the activation and writes the layer's
 * output: out[m, n] = round(sum * (in_scale * w_scale[n])) (+ bias[n], added after the rounding
 * in the output dtype), the operations and roundings of the torch code it replaced
 * ((acc * (input_scale * weight_scale)).to(dtype) + bias). */

typedef struct {
  const uint16_t* xb; /* activations as bf16 bits (exact FP8 values), packed: see gemv_prepare */
  const float* xf;    /* [M, K] the same as fp32 (portable path) */
  const uint8_t* w;   /* [N, K] */
  int64_t M, K, Kp, N; /* Kp: K rounded up to 64 */
  int fmt;
  float* y;           /* raw sums [M, N], or NULL when `out` gets the finished output */
  /* fused output */
  float in_scale;
  const float* w_scale; /* 1 value, or N when per_row */
  int per_row;
  const void* bias;   /* [N] in out_dt, or NULL */
  void* out;          /* [M, N] in out_dt */
  int out_dt;
} gemv_ctx;

static inline void gemv_store(const gemv_ctx* c, int64_t m, int64_t n, float acc) {
  if (c->y) { c->y[m * c->N + n] = acc; return; }
  const float v = acc * (c->in_scale * c->w_scale[c->per_row ? n : 0]);
  if (c->out_dt == IB_BF16) {
    uint16_t r = bf16_from_f32(v);
    if (c->bias) r = bf16_from_f32(u2f((uint32_t)r << 16) + u2f((uint32_t)((const uint16_t*)c->bias)[n] << 16));
    ((uint16_t*)c->out)[m * c->N + n] = r;
  } else {
    ((float*)c->out)[m * c->N + n] = c->bias ? v + ((const float*)c->bias)[n] : v;
  }
}

#if IB_AVX512BF16
#ifndef GEMV_NB
#define GEMV_NB 4 /* weight rows per block */
#endif
#ifndef GEMV_MB
#define GEMV_MB 4 /* activation rows per block: NB x MB = 16 accumulators, no spills */
#endif
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 2 /* blocks of weight rows the GEMV prefetches ahead */
#endif

/* out[j] = _mm512_reduce_add_ps(a[j]) for 16 vectors, the same additions in the same tree (GCC's
 * and clang's: lanes l + l+8, then l + l+4, l + l+2, l + l+1), done on all 16 at once: 15 vector
 * adds and 30 shuffles, where 16 separate reductions take about 150 instructions, a tenth of a
 * 4 x 4 block's multiply-adds at K = 2048. */
static inline void reduce16(const __m512* a, float* out) {
  __m512 s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; i++) /* [a.lo256 + a.hi256, b.lo256 + b.hi256] */
    s8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++) /* 128-bit lanes (0 + 1, 2 + 3) of each input */
    s4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s8[2 * i], s8[2 * i + 1], 0x88), _mm512_shuffle_f32x4(s8[2 * i], s8[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++) /* within 128-bit lanes: elements 0 + 2, 1 + 3 */
    s2[i] = _mm512_add_ps(_mm512_shuffle_ps(s4[2 * i], s4[2 * i + 1], 0x44), _mm512_shuffle_ps(s4[2 * i], s4[2 * i + 1], 0xEE));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s2[0], s2[1], 0x88), _mm512_shuffle_ps(s2[0], s2[1], 0xDD));
  /* lane of vector j's sum in r, found by tracing the shuffles above */
  const __m512i where = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(out, _mm512_permutexvar_ps(where, r));
}

/* One block: MT activation rows x GEMV_NB weight rows, all accumulators in registers. MT is a
 * compile-time constant at every call site (see the switch below), so the loops unroll fully; a
 * runtime row count here made the compiler spill the accumulators to the stack on every step.
 * Weights come either as FP8 rows decoded here (wbuf NULL) or as bf16 already decoded into wbuf
 * (packed like the activations: for each 32-wide slice of k, the block's GEMV_NB rows one after
 * the other, zero-padded to Kp): the same values, so the same sums. Packing puts everything one
 * step of k reads into one contiguous run, one stream for the hardware prefetcher instead of
 * one per row (rows of a power-of-two length also all fell into the same L1 sets). */
static inline __attribute__((always_inline)) void gemv_block(const gemv_ctx* c, const uint16_t* wbuf, int64_t n0,
                                                             int64_t nt, int64_t m0, const int MT, const int BUF,
                                                             const lut64_t* t) {
  const int64_t K = c->K, slices = c->Kp / 32;
  const uint8_t* wr[GEMV_NB];
  int64_t wb[GEMV_NB];
  for (int j = 0; j < GEMV_NB; j++) {
    const int64_t row = j < nt ? j : nt - 1; /* tail: repeat a row */
    wr[j] = c->w + (n0 + row) * K;
    wb[j] = row * 32;
  }
  const uint16_t* xblk = c->xb + (m0 / GEMV_MB) * slices * (GEMV_MB * 32);
  /* the rows after this block's, GEMV_PREFETCH blocks ahead, are fetched from memory while this one
   * computes (a decode step streams every weight once; the hardware prefetcher alone left the
   * GEMV waiting on memory) */
  const int64_t ahead = n0 + GEMV_PREFETCH * GEMV_NB, ahead_rows = c->N - ahead < GEMV_NB ? c->N - ahead : GEMV_NB;
  const uint8_t* pf = c->w + ahead * K;
  __m512 acc[GEMV_MB][GEMV_NB];
  for (int i = 0; i < MT; i++)
    for (int j = 0; j < GEMV_NB; j++) acc[i][j] = _mm512_setzero_ps();
  for (int64_t sl = 0; sl < slices; sl += 2) { /* 64 values of k: slices sl and sl + 1 */
    const int64_t k = sl * 32;
    const __mmask64 mask = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
    __m512i w0[GEMV_NB], w1[GEMV_NB];
    for (int j = 0; j < GEMV_NB; j++) {
      if (BUF) {
        w0[j] = _mm512_loadu_si512(wbuf + sl * (GEMV_NB * 32) + wb[j]);
        w1[j] = _mm512_loadu_si512(wbuf + (sl + 1) * (GEMV_NB * 32) + wb[j]);
      } else {
        decode64(wr[j] + k, mask, t, &w0[j], &w1[j]);
        if (j < ahead_rows) _mm_prefetch((const char*)(pf + j * K + k), _MM_HINT_T0);
      }
    }
    for (int i = 0; i < MT; i++) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xblk + sl * (GEMV_MB * 32) + i * 32);
      const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xblk + (sl + 1) * (GEMV_MB * 32) + i * 32);
      for (int j = 0; j < GEMV_NB; j++)
        acc[i][j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[i][j], x0, (__m512bh)w0[j]), x1, (__m512bh)w1[j]);
    }
  }
  if (MT * GEMV_NB == 16) { /* a full 4 x 4 block: the 16 lane sums at once, same tree */
    float sums[16];
    reduce16(&acc[0][0], sums);
    for (int i = 0; i < MT; i++)
      for (int j = 0; j < GEMV_NB; j++)
        if (j < nt) gemv_store(c, m0 + i, n0 + j, sums[i * GEMV_NB + j]);
    return;
  }
  for (int i = 0; i < MT; i++)
    for (int j = 0; j < GEMV_NB; j++)
      if (j < nt) gemv_store(c, m0 + i, n0 + j, _mm512_reduce_add_ps(acc[i][j]));
}

static void gemv_range(void* p, int64_t nb, int64_t ne) {
  const gemv_ctx* c = (const gemv_ctx*)p;
  const lut64_t t = lut64_init(c->fmt);
  /* More rows than one block: decode each block of weight rows once, for all activation rows. */
  uint16_t* wbuf = c->M > GEMV_MB ? (uint16_t*)aligned_alloc(64, (size_t)GEMV_NB * c->Kp * 2) : NULL;
  for (int64_t n0 = nb; n0 < ne; n0 += GEMV_NB) {
    const int64_t nt = ne - n0 < GEMV_NB ? ne - n0 : GEMV_NB;
    if (wbuf) {
      /* the next block's rows come from memory while this block computes */
      const int64_t next = n0 + GEMV_NB < ne ? n0 + GEMV_NB : ne; /* this chunk's: this thread's */
      const int64_t next_end = next + GEMV_NB < ne ? next + GEMV_NB : ne;
      for (int64_t off = next * c->K; off < next_end * c->K; off += 64) _mm_prefetch((const char*)(c->w + off), _MM_HINT_T1);
    }
    if (wbuf)
      for (int64_t j = 0; j < nt; j++) {
        const uint8_t* row = c->w + (n0 + j) * c->K;
        for (int64_t k = 0; k < c->Kp; k += 64) { /* zeros past K: the masked load reads 0, which decodes to +0 */
          const __mmask64 mask = c->K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (c->K - k)) - 1);
          __m512i w0, w1;
          decode64(row + k, mask, &t, &w0, &w1);
          _mm512_storeu_si512(wbuf + k / 32 * (GEMV_NB * 32) + j * 32, w0);
          _mm512_storeu_si512(wbuf + (k / 32 + 1) * (GEMV_NB * 32) + j * 32, w1);
        }
      }
    for (int64_t m0 = 0; m0 < c->M; m0 += GEMV_MB) {
      switch (c->M - m0 < GEMV_MB ? c->M - m0 : GEMV_MB) {
#define IB_BLOCK(MT)                                                  \
  case MT:                                                            \
    if (wbuf) { gemv_block(c, wbuf, n0, nt, m0, MT, 1, &t); } \
    else { gemv_block(c, NULL, n0, nt, m0, MT, 0, &t); }     \
    break;
        IB_BLOCK(1) IB_BLOCK(2) IB_BLOCK(3) IB_BLOCK(4)
#if GEMV_MB > 4
        IB_BLOCK(5) IB_BLOCK(6) IB_BLOCK(7) IB_BLOCK(8)
#endif
#undef IB_BLOCK
      }
    }
  }
  free(wbuf);
}
#else
static void gemv_range(void* p, int64_t nb, int64_t ne) {
  gemv_ctx* c = (gemv_ctx*)p;
  const int64_t K = c->K, M = c->M;
  float wrow[4096];
  float* sums = (float*)malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
  for (int64_t n = nb; n < ne; n++) {
    const uint8_t* w = c->w + n * K;
    for (int64_t m = 0; m < M; m++) sums[m] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += 4096) {
      const int64_t kt = K - k0 < 4096 ? K - k0 : 4096;
      for (int64_t j = 0; j < kt; j++)
        wrow[j] = c->fmt == IB_E4M3 ? f32_from_e4m3(w[k0 + j]) : f32_from_e5m2(w[k0 + j]);
      for (int64_t m = 0; m < M; m++) {
        const float* x = c->xf + m * K + k0;
        float acc[16] = {0};
        int64_t j = 0;
        for (; j + 16 <= kt; j += 16)
          for (int l = 0; l < 16; l++) acc[l] += x[j + l] * wrow[j + l];
        float s = 0.0f;
        for (; j < kt; j++) s += x[j] * wrow[j];
        for (int l = 0; l < 16; l++) s += acc[l];
        sums[m] += s;
      }
    }
    for (int64_t m = 0; m < M; m++) gemv_store(c, m, n, sums[m]);
  }
  free(sums);
}
#endif

#ifndef GEMV_MB
#define GEMV_MB 4 /* the portable build packs activations in blocks of this many rows too */
#endif
#ifndef GEMM_CHUNK_ROWS
#define GEMM_CHUNK_ROWS 32 /* weight rows per chunk of work in a GEMM (8 blocks of 4) */
#endif

/* Size in bytes of the scratch buffer ib_fp8_gemv / ib_fp8_linear need for M rows of K. */
int64_t ib_fp8_gemv_scratch(int64_t M, int64_t K) {
  const int64_t Mp = (M + GEMV_MB - 1) / GEMV_MB * GEMV_MB, Kp = (K + 63) / 64 * 64;
  return Mp * Kp * 2 + M * K * 4;
}

/* The activation as exact FP8 values in bf16 and (portable build) fp32, from FP8 bytes (xq) or
 * quantized here from x (the bytes ib_quantize would write). The bf16 copy is packed in blocks of
 * GEMV_MB rows: for each 32-wide slice of k, the block's rows one after the other (zero-padded to
 * Kp), so that a block of the GEMM reads one contiguous run per step of k. */
typedef struct {
  const uint8_t* xq;
  const void* x;
  int x_dt, fmt;
  float in_scale, fp8_max;
  int64_t K, Kp;
  uint16_t* xb;
  float* xf;
} prep_ctx;

/* Where x[m, k] goes: in each 64-wide chunk of k, the values decode64 puts in w0 (k % 16 < 8) fill
 * the first 32-wide slice and the rest the second, each in decode64's order. */
static inline uint16_t* packed_at(uint16_t* xb, int64_t Kp, int64_t m, int64_t k) {
  const int64_t j = k % 64, slice = k / 64 * 2 + (j % 16 >= 8), pos = j / 16 * 8 + j % 8;
  return xb + (m / GEMV_MB) * Kp * GEMV_MB + slice * (GEMV_MB * 32) + (m % GEMV_MB) * 32 + pos;
}

static void prepare_range(void* p, int64_t mb, int64_t me) {
  const prep_ctx* c = (const prep_ctx*)p;
  const int64_t K = c->K, Kp = c->Kp;
  for (int64_t m = mb; m < me; m++) {
#if IB_AVX512BF16 && IB_AVX512_QDQ
    if (!c->xq) { /* the rounding of qdq_range_avx512, kept unscaled: exact in bf16 */
      const qround_t q = qround_init(c->in_scale, c->fp8_max, c->fmt);
      const __m512i nan = _mm512_set1_epi32(c->fmt == IB_E4M3 ? 0x7FC0 : 0x7FE0); /* f32_from_e4m3/e5m2 of NaN */
      for (int64_t k = 0; k < Kp; k += 16) {
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (K > k ? (__mmask16)((1u << (K - k)) - 1) : 0);
        const __m512 v = qround16(&q, load16(c->x, c->x_dt, m * K + k, mask));
        __m512i u = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
        const __m512i sign = _mm512_and_si512(u, _mm512_set1_epi32(0x8000));
        u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(nan, sign));
        const __m256i w = _mm512_cvtepi32_epi16(u); /* k .. k + 15: 8 to each slice (packed_at) */
        _mm_storeu_si128((__m128i*)packed_at(c->xb, Kp, m, k), _mm256_castsi256_si128(w));
        _mm_storeu_si128((__m128i*)packed_at(c->xb, Kp, m, k + 8), _mm256_extracti128_si256(w, 1));
      }
      continue;
    }
#endif
    for (int64_t k = 0; k < K; k++) {
      const uint8_t q = c->xq ? c->xq[m * K + k]
                              : quant_one(load_hp(c->x, c->x_dt, m * K + k), c->in_scale, c->fp8_max, c->fmt);
      const float v = c->fmt == IB_E4M3 ? f32_from_e4m3(q) : f32_from_e5m2(q);
      *packed_at(c->xb, Kp, m, k) = (uint16_t)(f2u(v) >> 16);
      if (c->xf) c->xf[m * K + k] = v;
    }
    for (int64_t k = K; k < Kp; k++) *packed_at(c->xb, Kp, m, k) = 0;
  }
}

static void gemv_prepare(const uint8_t* xq, const void* x, int x_dt, float in_scale, float fp8_max, int64_t M,
                         int64_t K, int fmt, void* scratch, uint16_t** xb_out, float** xf_out, int nthreads) {
  const int64_t Mp = (M + GEMV_MB - 1) / GEMV_MB * GEMV_MB, Kp = (K + 63) / 64 * 64;
  prep_ctx c = {xq, x, x_dt, fmt, in_scale, fp8_max, K, Kp, (uint16_t*)scratch,
                IB_AVX512BF16 ? NULL : (float*)((char*)scratch + Mp * Kp * 2)};
  const int64_t grain = K > 0 && K < (1 << 14) ? (1 << 14) / K : 1;
  parallel_for(prepare_range, &c, M, grain, threads_for(M * K, nthreads, ELEMWISE_MIN_PER_THREAD));
  *xb_out = c.xb;
  *xf_out = c.xf;
}

static void gemv_run(gemv_ctx* c, int nthreads) {
  /* About 32K weights per chunk at one row, fewer as rows add work; whole blocks of weight rows. */
  int64_t grain = (1 << 15) / ((c->K > 0 ? c->K : 1) * (c->M > 0 ? c->M : 1));
  grain = grain < 4 ? 4 : (grain + 3) / 4 * 4;
  /* a GEMM's chunk holds several blocks, so that the block a thread prefetches is its own next one */
  if (c->M > GEMV_MB && grain < GEMM_CHUNK_ROWS) grain = GEMM_CHUNK_ROWS;
  parallel_for(gemv_range, c, c->N, grain, nthreads);
}

/* y[m, n] = sum_k fp8(xq[m, k]) * fp8(w[n, k]) in fp32 (unscaled). xq and w share `fmt`. */
void ib_fp8_gemv(const uint8_t* xq, int64_t M, int64_t K, const uint8_t* w, int64_t N, int fmt, float* y,
                 void* scratch, int nthreads) {
  pthread_once(&lut_once, build_luts);
  gemv_ctx c = {0};
  gemv_prepare(xq, NULL, 0, 1.0f, 0.0f, M, K, fmt, scratch, (uint16_t**)&c.xb, (float**)&c.xf, nthreads);
  c.w = w; c.M = M; c.K = K; c.Kp = (K + 63) / 64 * 64; c.N = N; c.fmt = fmt; c.y = y;
  gemv_run(&c, nthreads);
}

/* A static FP8 linear layer in one call: quantize x [M, K] (x_dt) with in_scale, multiply by the FP8
 * weight w [N, K] as above, scale, round to out_dt, add the bias (out_dt, or NULL). */
void ib_fp8_linear(const void* x, int x_dt, int64_t M, int64_t K, float in_scale, float fp8_max, const uint8_t* w,
                   int64_t N, int fmt, const float* w_scale, int per_row, const void* bias, void* out, int out_dt,
                   void* scratch, int nthreads) {
  pthread_once(&lut_once, build_luts);
  gemv_ctx c = {0};
  gemv_prepare(NULL, x, x_dt, in_scale, fp8_max, M, K, fmt, scratch, (uint16_t**)&c.xb, (float**)&c.xf, nthreads);
  c.w = w; c.M = M; c.K = K; c.Kp = (K + 63) / 64 * 64; c.N = N; c.fmt = fmt; c.y = NULL;
  c.in_scale = in_scale; c.w_scale = w_scale; c.per_row = per_row; c.bias = bias; c.out = out; c.out_dt = out_dt;
  gemv_run(&c, nthreads);
}

/* 1 when the AVX512-BF16 GEMV was compiled in, 0 for the portable loop. */
int ib_fp8_gemv_simd(void) { return IB_AVX512BF16; }

/* 1 when this CPU has the instruction sets the library was compiled with (-march=native on the
 * build machine); kernels/cpu.py refuses to use the library otherwise. Compiled for baseline
 * x86-64 so that calling it can never itself fault. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("arch=x86-64"))) int ib_cpu_supported(void) {
  __builtin_cpu_init();
#if defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2")) return 0;
#endif
#if defined(__FMA__)
  if (!__builtin_cpu_supports("fma")) return 0;
#endif
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return 0;
#endif
#if defined(__AVX512BW__)
  if (!__builtin_cpu_supports("avx512bw")) return 0;
#endif
#if defined(__AVX512VL__)
  if (!__builtin_cpu_supports("avx512vl")) return 0;
#endif
#if defined(__AVX512BF16__)
  if (!__builtin_cpu_supports("avx512bf16")) return 0;
#endif
  return 1;
}
#else
int ib_cpu_supported(void) { return 1; }
#endif
