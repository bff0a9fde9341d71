/* fastmerge fused CPU path: one streaming pass over K+1 flattened tensors.
 *
 * Implements DESIGN.md section 3 element-wise: delta, DARE (Philox) or magnitude sparsification,
 * rescale, sign consensus, weighted sum, normalize, lambda, one cast on store. Everything is
 * computed in fp32 in the same operation order as fastmerge.reference, so masks are bit-identical
 * and values agree to the last ulp in practice. Built once per machine by fastmerge.cpu with
 * -ffp-contract=off (no FMA contraction: the reference does not fuse either).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <omp.h>

#define FM_MAXK 32
#define FM_BLOCK 256

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { SP_NONE = 0, SP_RANDOM = 1, SP_MAGNITUDE = 2 };
enum { CS_NONE = 0, CS_SUM = 1, CS_COUNT = 2 };

typedef struct {
    int64_t n;
    int32_t k;
    int32_t sparsify;
    int32_t consensus;
    int32_t normalize;
    int32_t threads;
    int32_t dtype_out;
    float lambda_;
    float pad_;
    const void *base; /* NULL: no base (linear) */
    int32_t dtype_base;
    int32_t pad2_;
    const void *x[FM_MAXK];
    int32_t dtype_x[FM_MAXK];
    float weight[FM_MAXK];
    float density[FM_MAXK];
    float scale[FM_MAXK];
    float tau[FM_MAXK];
    uint64_t seed[FM_MAXK / 4];
    void *out;
    int64_t j0; /* flat index of element 0 of this piece within its 2**31 chunk */
    /* keep bits of this piece, bit m for model m (K <= 8): written by fm_sums when bits_mode == 1,
     * read by fm_merge when bits_mode == 2, so the l1 rescale does not draw Philox twice */
    uint8_t *keepbits;
    int32_t bits_mode;
    int32_t pad3_;
    int64_t *nonfinite; /* NULL, or K + 1 counters (base, then models) of NaN/Inf inputs */
    /* magnitude sparsification keeps |d| > tau, and of the elements with |d| == tau those at
     * indices i < tie_end (relative to element 0 of this piece): exactly m = int(rho * n) kept,
     * ties broken by the lowest flat index (DESIGN.md section 3) */
    int64_t tie_end[FM_MAXK];
    /* DARE draw cache (random sparsification only): one byte per element and model,
     * floor(u * 256) clamped to 255, at draws + m * draws_stride + element. draws_mode 1 writes it
     * while drawing Philox; 2 reads it instead of drawing: u < rho is decided by the byte alone
     * unless the byte is rho's own bucket, and only those elements (1 in 256) are drawn again. The
     * masks are the same bits either way; Philox is ~30% of a dare_ties merge on an AVX2 core. */
    uint8_t *draws;
    int64_t draws_stride;
    int32_t draws_mode;
    int32_t pad4_;
} fm_params;

/* sizeof(fm_params): fastmerge.cpu mirrors the struct in ctypes and checks its size against this
 * when it loads the library (a one-sided edit would otherwise corrupt memory silently). */
size_t fm_params_size(void) { return sizeof(fm_params); }

/* Which vector path this build took (fastmerge.cpu.isa(): benchmarks name it; tests check that a
 * build told to leave AVX-512 or AVX2 out took the narrower path). */
const char *fm_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}

/* dst[i] = p[s + i] for i < cnt, upcast to fp32; one loop per dtype so each vectorizes. */
static void load_block(const void *p, int dt, int64_t s, int cnt, float *restrict dst) {
    if (dt == DT_F32) {
        const float *src = (const float *)p + s;
        for (int i = 0; i < cnt; i++) dst[i] = src[i];
    } else if (dt == DT_BF16) {
        const uint16_t *src = (const uint16_t *)p + s;
        uint32_t *d = (uint32_t *)dst;
        for (int i = 0; i < cnt; i++) d[i] = ((uint32_t)src[i]) << 16;
    } else {
        const _Float16 *src = (const _Float16 *)p + s;
        for (int i = 0; i < cnt; i++) dst[i] = (float)src[i];
    }
}

/* p[s + i] = cast(src[i]), rounding to nearest even as torch's .to(dtype) does. */
static void store_block(void *p, int dt, int64_t s, int cnt, const float *restrict src) {
    if (dt == DT_F32) {
        float *d = (float *)p + s;
        for (int i = 0; i < cnt; i++) d[i] = src[i];
    } else if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)p + s;
        const uint32_t *u = (const uint32_t *)src;
        for (int i = 0; i < cnt; i++) {
            uint32_t r = (u[i] + 0x7FFFu + ((u[i] >> 16) & 1u)) >> 16;
            d[i] = (uint16_t)(((u[i] & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC0u : r);
        }
    } else {
        _Float16 *d = (_Float16 *)p + s;
        for (int i = 0; i < cnt; i++) d[i] = (_Float16)src[i];
    }
}

/* Triton's uint_to_uniform_float: x as int32, negative -> ~x, times 4.6566127342e-10 in fp32. */
static inline float to_uniform(uint32_t u) {
    int32_t x = (int32_t)u;
    x = x < 0 ? ~x : x;
    return (float)x * 4.6566127342e-10f;
}

/* Philox runs in FM_LANES uint32 vector lanes: 16 (one zmm) with AVX-512, 8 (one ymm) with AVX2,
 * 8 in GCC's generic vectors elsewhere (two 128-bit registers on SSE2 / NEON). A 16-lane vector
 * without AVX-512 is two ymm halves, and the Philox state (4 of them) plus products spilled to the
 * stack on every round: 8x slower on an AVX2-only Zen 3 than 8 lanes (perf samples). */
#if defined(__AVX512F__)
#define FM_LANES 16
#else
#define FM_LANES 8
#endif
typedef uint32_t fm_u32v __attribute__((vector_size(4 * FM_LANES)));
typedef uint64_t fm_u64v __attribute__((vector_size(4 * FM_LANES)));
typedef int32_t fm_i32v __attribute__((vector_size(4 * FM_LANES)));
typedef float fm_f32v __attribute__((vector_size(4 * FM_LANES)));

/* (hi, lo) of a * x for every uint32 lane: even and odd lanes as 32x32->64 products, so one
 * vector multiply serves half the lanes with no widening shuffles. With AVX-512 and AVX2 the
 * products are spelled as vpmuludq: from the generic form GCC emits the 64x64 vpmullq (AVX-512) or a
 * three-multiply emulation of it (AVX2). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline void mulhilo(uint64_t a, fm_u32v x, fm_u32v *hi, fm_u32v *lo) {
    const __m512i xv = (__m512i)x, av = _mm512_set1_epi64((long long)a);
    const __m512i pe = _mm512_mul_epu32(xv, av);
    const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(xv, 32), av);
    *lo = (fm_u32v)_mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
    *hi = (fm_u32v)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline void mulhilo(uint64_t a, fm_u32v x, fm_u32v *hi, fm_u32v *lo) {
    const __m256i xv = (__m256i)x, av = _mm256_set1_epi64x((long long)a);
    const __m256i pe = _mm256_mul_epu32(xv, av);
    const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(xv, 32), av);
    *lo = (fm_u32v)_mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
    *hi = (fm_u32v)_mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}
#else
static inline void mulhilo(uint64_t a, fm_u32v x, fm_u32v *hi, fm_u32v *lo) {
    const fm_u64v w = (fm_u64v)x;
    const fm_u64v pe = (w & 0xFFFFFFFFull) * a;
    const fm_u64v po = (w >> 32) * a;
    *lo = (fm_u32v)((pe & 0xFFFFFFFFull) | (po << 32));
    *hi = (fm_u32v)((pe >> 32) | (po & 0xFFFFFFFF00000000ull));
}
#endif

static inline fm_f32v to_uniform_v(fm_u32v u) {
    fm_i32v x = (fm_i32v)u;
    x = x ^ (x >> 31); /* x < 0 ? ~x : x (arithmetic shift: all ones when negative) */
    return __builtin_convertvector(x, fm_f32v) * 4.6566127342e-10f;
}

/* Philox4x32-10 of one index, scalar: the four outputs of counter (j, 0, 0, 0). */
static void philox_one(uint64_t seed, int64_t j, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)j, c1 = 0, c2 = 0, c3 = 0, k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t pb = (uint64_t)0xCD9E8D57u * c2;
        uint64_t pa = (uint64_t)0xD2511F53u * c0;
        uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)pb;
        c3 = (uint32_t)pa;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

/* A uniform's (or a density's) bucket of the draw cache: floor(u * 256), exact in fp32 (a power-of-
 * two multiply), clamped to 255 (u and rho may be 1.0; below 0 is 0). The bucket of u below rho's
 * means u < rho, above it u >= rho; in it, the draw decides. */
static inline uint8_t draw_bucket(float u) {
    const float b = u * 256.0f;
    return b >= 255.0f ? 255 : b <= 0.0f ? 0 : (uint8_t)(int)b;
}

/* Philox4x32-10 with counter (j, 0, 0, 0), key (seed lo, seed hi): exactly
 * triton.language.randint4x(seed, j); four uniforms per index. FM_LANES indices at a time in
 * uint32 vector lanes, scalar tail. */
static void philox_block(uint64_t seed, int64_t j, int cnt, float *restrict u0, float *restrict u1,
                         float *restrict u2, float *restrict u3) {
    const uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
    fm_u32v iota;
    for (int l = 0; l < FM_LANES; l++) iota[l] = (uint32_t)l;
    int i = 0;
    for (; i + FM_LANES <= cnt; i += FM_LANES) {
        fm_u32v c0 = iota + (uint32_t)(j + i), c1 = {0}, c2 = {0}, c3 = {0};
        uint32_t k0 = key0, k1 = key1;
        for (int r = 0; r < 10; r++) {
            fm_u32v hb, lb, ha, la;
            mulhilo(0xCD9E8D57u, c2, &hb, &lb);
            mulhilo(0xD2511F53u, c0, &ha, &la);
            c0 = hb ^ c1 ^ k0;
            c2 = ha ^ c3 ^ k1;
            c1 = lb;
            c3 = la;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const fm_f32v f0 = to_uniform_v(c0), f1 = to_uniform_v(c1), f2 = to_uniform_v(c2), f3 = to_uniform_v(c3);
        memcpy(u0 + i, &f0, sizeof f0);
        memcpy(u1 + i, &f1, sizeof f1);
        memcpy(u2 + i, &f2, sizeof f2);
        memcpy(u3 + i, &f3, sizeof f3);
    }
    for (; i < cnt; i++) {
        uint32_t c[4];
        philox_one(seed, j + i, c);
        u0[i] = to_uniform(c[0]);
        u1[i] = to_uniform(c[1]);
        u2[i] = to_uniform(c[2]);
        u3[i] = to_uniform(c[3]);
    }
}

typedef struct {
    float b[FM_BLOCK];
    const float *base; /* the block's base values: b, or an fp32 base read in place */
    float d[FM_MAXK][FM_BLOCK];
    float keep[FM_MAXK + 3][FM_BLOCK]; /* 1 kept, 0 dropped; +3 rows take spare Philox lanes */
    float v[FM_MAXK][FM_BLOCK];
} fm_scratch;

static inline int block_count(int64_t n, int64_t s) {
    return (int)((n - s) < FM_BLOCK ? (n - s) : FM_BLOCK);
}

static inline int64_t count_nonfinite_block(const float *restrict v, int cnt) {
    const uint32_t *u = (const uint32_t *)v;
    int64_t bad = 0;
    for (int i = 0; i < cnt; i++) bad += (u[i] & 0x7F800000u) == 0x7F800000u;
    return bad;
}

/* Deltas and keep flags of the block [s, s + cnt); adds NaN/Inf counts of the inputs to bad[]
 * when bad is not NULL (fm_merge visits every element exactly once, so it counts). */
static void block_deltas(const fm_params *p, int64_t s, int cnt, fm_scratch *w, int64_t *bad) {
    const int K = p->k;
    /* fp32 inputs are read in place: copying them into the scratch first (a memcpy per block and
     * input) took a fifth of an fp32 merge */
    if (p->base && p->dtype_base == DT_F32) {
        w->base = (const float *)p->base + s;
        if (bad) bad[0] += count_nonfinite_block(w->base, cnt);
    } else if (p->base) {
        load_block(p->base, p->dtype_base, s, cnt, w->b);
        if (bad) bad[0] += count_nonfinite_block(w->b, cnt);
        w->base = w->b;
    } else {
        for (int i = 0; i < cnt; i++) w->b[i] = 0.0f;
        w->base = w->b;
    }
    for (int m = 0; m < K; m++) {
        float *restrict d = w->d[m];
        const float *b = w->base; /* may be the caller's memory: no restrict */
        if (p->dtype_x[m] == DT_F32) {
            const float *x = (const float *)p->x[m] + s;
            if (bad) bad[1 + m] += count_nonfinite_block(x, cnt);
            for (int i = 0; i < cnt; i++) d[i] = x[i] - b[i];
        } else {
            load_block(p->x[m], p->dtype_x[m], s, cnt, d);
            if (bad) bad[1 + m] += count_nonfinite_block(d, cnt);
            for (int i = 0; i < cnt; i++) d[i] = d[i] - b[i];
        }
    }
    if (p->bits_mode == 2) {
        const uint8_t *restrict bits = p->keepbits + s;
        for (int m = 0; m < K; m++) {
            float *restrict kp = w->keep[m];
            for (int i = 0; i < cnt; i++) kp[i] = (float)((bits[i] >> m) & 1u);
        }
        return;
    }
    if (p->sparsify == SP_RANDOM && p->draws_mode == 2) {
        for (int m = 0; m < K; m++) {
            float *restrict kp = w->keep[m];
            const uint8_t *restrict c = p->draws + m * p->draws_stride + s;
            const float rho = p->density[m];
            const uint8_t tb = draw_bucket(rho);
            int edge = 0;
            for (int i = 0; i < cnt; i++) {
                kp[i] = c[i] < tb ? 1.0f : 0.0f;
                edge |= c[i] == tb;
            }
            if (!edge) continue;
            /* rho's bucket, 8 bytes at a time: a byte-by-byte scan of every block took a third of
             * this function (a block of 256 holds such a byte 63% of the time) */
            const uint64_t ones = 0x0101010101010101ull, t8 = ones * tb;
            for (int i0 = 0; i0 < cnt; i0 += 8) {
                const int lim = cnt - i0 < 8 ? cnt - i0 : 8;
                if (lim == 8) {
                    uint64_t v;
                    memcpy(&v, c + i0, 8);
                    v ^= t8; /* a zero byte where c == tb */
                    if (!((v - ones) & ~v & 0x8080808080808080ull)) continue;
                }
                for (int i = i0; i < i0 + lim; i++)
                    if (c[i] == tb) {
                        uint32_t r[4];
                        philox_one(p->seed[m / 4], p->j0 + s + i, r);
                        kp[i] = to_uniform(r[m % 4]) < rho ? 1.0f : 0.0f;
                    }
            }
        }
    } else if (p->sparsify == SP_RANDOM) {
        for (int g = 0; 4 * g < K; g++) {
            philox_block(p->seed[g], p->j0 + s, cnt, w->keep[4 * g], w->keep[4 * g + 1],
                         w->keep[4 * g + 2], w->keep[4 * g + 3]);
            for (int l = 0; l < 4 && 4 * g + l < K; l++) {
                float *restrict kp = w->keep[4 * g + l];
                const float rho = p->density[4 * g + l];
                if (p->draws_mode == 1) {
                    uint8_t *restrict c = p->draws + (4 * g + l) * p->draws_stride + s;
                    for (int i = 0; i < cnt; i++) c[i] = draw_bucket(kp[i]);
                }
                for (int i = 0; i < cnt; i++) kp[i] = kp[i] < rho ? 1.0f : 0.0f;
            }
        }
    } else {
        for (int m = 0; m < K; m++) {
            float *restrict kp = w->keep[m];
            const float *restrict d = w->d[m];
            const float tau = p->tau[m];
            /* ties at tau are kept at block indices below te: >= before it, > from it on (two
             * plain loops vectorize; one with the index test in it did not) */
            const int64_t te = p->tie_end[m] - s;
            const int lim = te <= 0 ? 0 : te >= cnt ? cnt : (int)te;
            if (p->sparsify == SP_MAGNITUDE) {
                for (int i = 0; i < lim; i++) kp[i] = fabsf(d[i]) >= tau ? 1.0f : 0.0f;
                for (int i = lim; i < cnt; i++) kp[i] = fabsf(d[i]) > tau ? 1.0f : 0.0f;
            } else
                for (int i = 0; i < cnt; i++) kp[i] = 1.0f;
        }
    }
    if (p->bits_mode == 1) {
        uint8_t *restrict bits = p->keepbits + s;
        for (int i = 0; i < cnt; i++) bits[i] = 0;
        for (int m = 0; m < K; m++) {
            const float *restrict kp = w->keep[m];
            for (int i = 0; i < cnt; i++) bits[i] |= (uint8_t)((kp[i] != 0.0f) << m);
        }
    }
}

/* Per-thread scratch that outlives a call: a fresh 135 KB block (and the 1.5 MB histogram) per call
 * and thread came from mmap, faulted its pages in and was unmapped again -- for every tensor of a
 * model. OpenMP pool threads are reused across calls, so these are allocated once per thread. */
static __thread fm_scratch *tl_scratch;
static __thread uint32_t *tl_hist;
static __thread size_t tl_hist_len;

static fm_scratch *thread_scratch(void) {
    if (!tl_scratch) tl_scratch = aligned_alloc(64, sizeof(fm_scratch));
    return tl_scratch;
}

/* n zeroed counters; the caller leaves them zeroed again when done */
static uint32_t *thread_hist(size_t n) {
    if (tl_hist_len < n) {
        free(tl_hist);
        tl_hist = calloc(n, sizeof(uint32_t));
        tl_hist_len = tl_hist ? n : 0;
    }
    return tl_hist;
}

/* Per-model sum|delta| and sum|keep*delta| (the "l1" rescale), accumulated in double. Each thread
 * sums its static share of blocks; the shares are added in thread order after the loop, not as the
 * threads finish, so the totals' last bits do not depend on timing (the same thread count gives the
 * same scale in every run). */
void fm_sums(const fm_params *p, double *total, double *kept) {
    const int K = p->k;
    const int64_t nblk = (p->n + FM_BLOCK - 1) / FM_BLOCK;
    for (int m = 0; m < K; m++) total[m] = kept[m] = 0.0;
    const int nt = p->threads > 0 ? p->threads : 1;
    double part[nt][2][FM_MAXK];
    int team = 1;
    memset(part, 0, sizeof part);
#pragma omp parallel num_threads(nt)
    {
        double *lt = part[omp_get_thread_num()][0], *lk = part[omp_get_thread_num()][1];
#pragma omp single
        team = omp_get_num_threads();
        fm_scratch *w = thread_scratch();
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t s = blk * FM_BLOCK;
            const int cnt = block_count(p->n, s);
            block_deltas(p, s, cnt, w, NULL);
            for (int m = 0; m < K; m++) {
                const float *restrict d = w->d[m];
                const float *restrict kp = w->keep[m];
                /* eight independent double lanes: no serial dependency chain, and vectorizable */
                double bt[8] = {0}, bk[8] = {0};
                int i = 0;
                for (; i + 8 <= cnt; i += 8)
                    for (int l = 0; l < 8; l++) {
                        const double a = fabsf(d[i + l]);
                        bt[l] += a;
                        bk[l] += a * kp[i + l];
                    }
                for (; i < cnt; i++) {
                    const double a = fabsf(d[i]);
                    bt[0] += a;
                    bk[0] += a * kp[i];
                }
                for (int l = 0; l < 8; l++) {
                    lt[m] += bt[l];
                    lk[m] += bk[l];
                }
            }
        }
    }
    for (int t = 0; t < team; t++)
        for (int m = 0; m < K; m++) { total[m] += part[t][0][m]; kept[m] += part[t][1][m]; }
}

/* keys[m * n + i] = bits of |x_m[i] - base[i]| as fp32, for tensors too small for a histogram
 * pass to pay (the caller selects among them). One thread: n is at most a few 65536. */
void fm_abs_keys(const fm_params *p, uint32_t *keys) {
    const int K = p->k;
    const int64_t n = p->n;
    fm_scratch *w = thread_scratch();
    fm_params q = *p;
    q.sparsify = SP_NONE;
    q.bits_mode = 0;
    for (int64_t s = 0; s < n; s += FM_BLOCK) {
        const int cnt = block_count(n, s);
        block_deltas(&q, s, cnt, w, NULL);
        for (int m = 0; m < K; m++) {
            const float *restrict d = w->d[m];
            uint32_t *restrict k = keys + (size_t)m * n + s;
            for (int i = 0; i < cnt; i++) {
                float a = fabsf(d[i]);
                memcpy(&k[i], &a, 4);
            }
        }
    }
}

/* Histograms of the bits of |x_m - base| as fp32 (non-negative, so bit order is value order),
 * all K models in one pass, for an exact radix select of the m-th largest |delta| without sorting.
 * level 0: 131072 bins per model, the top 16 bits and one more bit saying whether the low 16 bits
 * are nonzero; this order agrees with the value order, and a selected "low bits zero" bin holds one
 * value only, so the select is then exact after one pass. Deltas of bf16/fp16 weights are short
 * numbers (x and base mostly share an exponent): on the 250M bench family 87% of the thresholds
 * end there. level 1 (otherwise): 65536 bins per model, the low 16 bits of the elements whose top
 * 16 bits equal prefix[m]. hist holds K * bins counters. */
#define FM_BINS0 131072
void fm_abs_hist(const fm_params *p, int level, const uint32_t *prefix, int64_t *hist) {
    const int K = p->k;
    const int64_t nblk = (p->n + FM_BLOCK - 1) / FM_BLOCK;
    const size_t bins = level == 0 ? FM_BINS0 : 65536;
    memset(hist, 0, sizeof(int64_t) * bins * K);
#pragma omp parallel num_threads(p->threads)
    {
        uint32_t *local = thread_hist(bins * 2 * K); /* a block adds < 2**32 */
        fm_scratch *w = thread_scratch();
        uint32_t key[FM_BLOCK];
        fm_params q = *p;
        q.sparsify = SP_NONE;
        q.bits_mode = 0;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t s = blk * FM_BLOCK;
            const int cnt = block_count(p->n, s);
            block_deltas(&q, s, cnt, w, NULL);
            for (int m = 0; m < K; m++) {
                const float *restrict d = w->d[m];
                uint32_t *restrict h = local + bins * m;
                for (int i = 0; i < cnt; i++) {
                    float a = fabsf(d[i]);
                    memcpy(&key[i], &a, 4);
                }
                if (level == 0) {
                    /* two histograms, alternating, so that runs of one bin do not chain one
                     * counter's store to its next load */
                    uint32_t *restrict h2 = local + bins * (K + m);
                    for (int i = 0; i < cnt; i++) key[i] = ((key[i] >> 16) << 1) | ((key[i] & 0xFFFFu) != 0u);
                    int i = 0;
                    for (; i + 2 <= cnt; i += 2) { h[key[i]]++; h2[key[i + 1]]++; }
                    for (; i < cnt; i++) h[key[i]]++;
                } else {
                    /* most keys in the selected bin have zero low bits: those are counted in a
                     * vectorized sum, not incremented one by one into the same counter */
                    const uint32_t pre = prefix[m], exact = pre << 16;
                    uint32_t zero = 0;
                    for (int i = 0; i < cnt; i++) zero += key[i] == exact;
                    h[0] += zero;
                    /* one unsigned compare: in the bin with nonzero low bits (rare, so predictable) */
                    for (int i = 0; i < cnt; i++)
                        if (key[i] - exact - 1u < 0xFFFFu) h[key[i] & 0xFFFFu]++;
                }
            }
            if ((blk & 0xFFFF) == 0xFFFF) { /* flush before a uint32 counter could overflow */
#pragma omp critical
                for (size_t h = 0; h < bins * K; h++) hist[h] += local[h] + local[h + bins * K];
                memset(local, 0, sizeof(uint32_t) * bins * 2 * K);
            }
        }
#pragma omp critical
        for (size_t h = 0; h < bins * K; h++) hist[h] += local[h] + local[h + bins * K];
        memset(local, 0, sizeof(uint32_t) * bins * 2 * K);
    }
}

/* The rank[j]-th element with |x_m - base| == tau[m], m = models[j], counted from the start
 * (backward == 0) or from the end: its index + 1 goes to ends[m]. Blocks are counted in rounds of
 * `span` consecutive blocks (all threads on one round) until every model's rank is reached; the
 * block holding it is then read again to find the index. */
static void tie_scan(const fm_params *q, const int *models, int nm, const int64_t *rank, int backward,
                     int64_t *ends, int32_t *cnts, int64_t span) {
    const int64_t nblk = (q->n + FM_BLOCK - 1) / FM_BLOCK;
    int64_t seen[FM_MAXK] = {0};
    int open = nm;
    fm_scratch *w = thread_scratch();
    for (int64_t done = 0; done < nblk && open > 0; done += span) {
        const int64_t nb = nblk - done < span ? nblk - done : span;
#pragma omp parallel num_threads(q->threads)
        {
            fm_scratch *tw = thread_scratch();
#pragma omp for schedule(static)
            for (int64_t r = 0; r < nb; r++) {
                const int64_t blk = backward ? nblk - 1 - (done + r) : done + r;
                const int64_t s = blk * FM_BLOCK;
                const int cnt = block_count(q->n, s);
                block_deltas(q, s, cnt, tw, NULL);
                for (int j = 0; j < nm; j++) {
                    const float *restrict d = tw->d[models[j]];
                    const float tau = q->tau[models[j]];
                    int32_t c = 0;
                    for (int i = 0; i < cnt; i++) c += fabsf(d[i]) == tau;
                    cnts[(size_t)j * span + r] = c;
                }
            }
        }
        for (int j = 0; j < nm; j++) {
            const int m = models[j];
            if (ends[m] >= 0) continue;
            for (int64_t r = 0; r < nb; r++) {
                const int32_t c = cnts[(size_t)j * span + r];
                if (seen[j] + c < rank[j]) {
                    seen[j] += c;
                    continue;
                }
                const int64_t blk = backward ? nblk - 1 - (done + r) : done + r;
                const int64_t s = blk * FM_BLOCK;
                const int cnt = block_count(q->n, s);
                block_deltas(q, s, cnt, w, NULL);
                for (int k = 0; k < cnt; k++) {
                    const int i = backward ? cnt - 1 - k : k;
                    if (fabsf(w->d[m][i]) == q->tau[m] && ++seen[j] == rank[j]) {
                        ends[m] = s + i + 1;
                        break;
                    }
                }
                open--;
                break;
            }
        }
    }
}

/* For each model m: the index e (0 <= e <= n) such that [0, e) holds exactly need[m] of the
 * equal[m] elements with |x_m - base| == tau[m] (1 <= need[m] <= equal[m]), and element e - 1 is
 * one of them: where the magnitude keep mask stops taking ties. Ties spread over a tensor, so the
 * need-th from the start is found scanning from the start when need <= equal / 2 and as the
 * (equal - need + 1)-th from the end otherwise: at most about half the tensor is read. */
#define FM_TIE_ROUND 64 /* blocks per thread and round */
void fm_tie_ends(const fm_params *p, const int64_t *need, const int64_t *equal, int64_t *ends) {
    const int K = p->k;
    const int64_t span = (int64_t)FM_TIE_ROUND * (p->threads > 0 ? p->threads : 1);
    int32_t *cnts = malloc(sizeof(int32_t) * (size_t)span * (size_t)K);
    fm_params q = *p;
    q.sparsify = SP_NONE;
    q.bits_mode = 0;
    for (int m = 0; m < K; m++) ends[m] = -1;
    if (!cnts) return;
    for (int backward = 0; backward < 2; backward++) {
        int models[FM_MAXK], nm = 0;
        int64_t rank[FM_MAXK];
        for (int m = 0; m < K; m++) {
            if ((2 * need[m] > equal[m]) != backward) continue;
            models[nm] = m;
            rank[nm++] = backward ? equal[m] - need[m] + 1 : need[m];
        }
        if (nm) tie_scan(&q, models, nm, rank, backward, ends, cnts, span);
    }
    free(cnts);
}

/* The bin holding the rank-th largest element (rank >= 1) of a histogram, scanning from the top,
 * and the element's rank within that bin (a cumulative sum over 131072 bins in numpy cost more). */
int64_t fm_select(const int64_t *hist, int64_t bins, int64_t rank, int64_t *rank_in_bin) {
    int64_t above = 0;
    for (int64_t i = bins - 1; i >= 0; i--) {
        if (above + hist[i] >= rank) {
            *rank_in_bin = rank - above;
            return i;
        }
        above += hist[i];
    }
    *rank_in_bin = 0;
    return -1;
}

void fm_merge(const fm_params *p) {
    const int K = p->k;
    const int64_t nblk = (p->n + FM_BLOCK - 1) / FM_BLOCK;
#pragma omp parallel num_threads(p->threads)
    {
        fm_scratch *w = thread_scratch();
        float sgn[FM_BLOCK], mixed[FM_BLOCK], div[FM_BLOCK];
        int64_t bad[FM_MAXK + 1] = {0};
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t s = blk * FM_BLOCK;
            const int cnt = block_count(p->n, s);
            block_deltas(p, s, cnt, w, p->nonfinite ? bad : NULL);
            for (int i = 0; i < cnt; i++) { sgn[i] = 0.0f; mixed[i] = 0.0f; div[i] = 0.0f; }
            for (int m = 0; m < K; m++) {
                const float sc = p->scale[m], wt = p->weight[m];
                const float *restrict d = w->d[m];
                const float *restrict kp = w->keep[m];
                float *restrict vm = w->v[m];
                for (int i = 0; i < cnt; i++) {
                    const float t = (d[i] * sc) * wt; /* always computed: a select, not a branch */
                    vm[i] = kp[i] != 0.0f ? t : 0.0f;
                }
                if (p->consensus == CS_SUM)
                    for (int i = 0; i < cnt; i++) sgn[i] = sgn[i] + vm[i];
                else if (p->consensus == CS_COUNT)
                    for (int i = 0; i < cnt; i++)
                        sgn[i] = sgn[i] + ((float)(vm[i] > 0.0f) - (float)(vm[i] < 0.0f));
            }
            if (p->consensus == CS_NONE) {
                for (int m = 0; m < K; m++) {
                    const float wt = p->weight[m];
                    const float *restrict vm = w->v[m];
                    for (int i = 0; i < cnt; i++) {
                        mixed[i] = mixed[i] + vm[i];
                        div[i] = div[i] + wt;
                    }
                }
                for (int i = 0; i < cnt; i++) div[i] = fabsf(div[i]) < 1e-8f ? 1.0f : div[i];
            } else {
                for (int m = 0; m < K; m++) {
                    const float wt = p->weight[m];
                    const float *restrict vm = w->v[m];
                    for (int i = 0; i < cnt; i++) {
                        /* agree: v has the elected sign (zero never agrees); branch-free so it
                         * vectorizes. mixed never holds -0, so mixed + 0 == mixed exactly. */
                        const float sigma = sgn[i] >= 0.0f ? 1.0f : -1.0f;
                        const int agree = vm[i] * sigma > 0.0f;
                        mixed[i] = mixed[i] + (agree ? vm[i] : 0.0f);
                        div[i] = div[i] + (agree ? wt : 0.0f);
                    }
                }
                for (int i = 0; i < cnt; i++) div[i] = div[i] == 0.0f ? 1.0f : div[i];
            }
            const float lam = p->lambda_;
            if (p->normalize) for (int i = 0; i < cnt; i++) mixed[i] = mixed[i] / div[i];
            if (lam != 1.0f) for (int i = 0; i < cnt; i++) mixed[i] = mixed[i] * lam;
            const float *b = w->base;
            if (p->dtype_out == DT_F32) {
                float *o = (float *)p->out + s; /* may be the base itself (an in-place merge) */
                for (int i = 0; i < cnt; i++) o[i] = b[i] + mixed[i];
            } else {
                for (int i = 0; i < cnt; i++) mixed[i] = b[i] + mixed[i];
                store_block(p->out, p->dtype_out, s, cnt, mixed);
            }
        }
        if (p->nonfinite) {
#pragma omp critical
            for (int m = 0; m <= K; m++) p->nonfinite[m] += bad[m];
        }
    }
}

/* Count of NaN/Inf elements (a warning for the user, never a reason to stop). */
int64_t fm_count_nonfinite(const void *p, int dt, int64_t n) {
    int64_t bad = 0;
    if (dt == DT_F32) {
        const uint32_t *u = (const uint32_t *)p;
        for (int64_t i = 0; i < n; i++) bad += (u[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t mask = dt == DT_BF16 ? 0x7F80u : 0x7C00u;
        const uint16_t *u = (const uint16_t *)p;
        for (int64_t i = 0; i < n; i++) bad += (u[i] & mask) == mask;
    }
    return bad;
}

/* ==============================================================================================
 * Sparsifying pre-passes and the combine of the torch-route methods (della, della_linear,
 * breadcrumbs, breadcrumbs_ties, sce; fastmerge.sparsify_cpu), bit for bit as the pure-torch
 * functions of fastmerge.methods_math. Their own parameter struct (fm_sp_params, mirrored in
 * fastmerge.sparsify_cpu): they share only the block helpers and philox_block above.
 * ============================================================================================== */

typedef struct {
    int64_t n;                 /* elements of the tensor */
    int64_t rows, cols;        /* della: rank rows (a 1-D tensor is one row) */
    int32_t k, threads;
    int32_t consensus, normalize; /* combine: CS_NONE or CS_SUM; normalize by the agreeing weights */
    float lambda_, div_none;   /* div_none: the divisor without consensus (sum of weights, guarded) */
    const void *base;
    int32_t dtype_base, ngroups; /* ngroups: Philox key groups of four models */
    const void *x[FM_MAXK];
    int32_t dtype_x[FM_MAXK];
    float weight[FM_MAXK];
    float scale[FM_MAXK];      /* l1 rescale of the kept values (1: none) */
    int32_t mode[FM_MAXK];     /* della: 0 keep all, 1 keep none, 2 MAGPRUNE */
    float lo[FM_MAXK];         /* della: density - epsilon, as fp32 */
    float eps[FM_MAXK];        /* della: epsilon, as fp32 */
    const uint64_t *seeds;     /* della: Philox keys [chunk][group] */
    int64_t chunk;             /* elements per Philox chunk (2**31) */
    uint8_t *bits;             /* keep bits, bit m for model m (K <= 8) */
    float *out;                /* combine: fp32 output */
    double total[FM_MAXK];     /* della pre-pass: sum |delta| per model */
    double kept[FM_MAXK];      /* della pre-pass: sum |delta| over the kept elements */
} fm_sp_params;

size_t fm_sp_params_size(void) { return sizeof(fm_sp_params); }

/* |d| as ordered bits: fp32 bits of a non-negative number order as its value; every NaN is one
 * key above +inf (torch's sorts put NaN last, all NaNs equal) */
static inline uint32_t sp_abs_key(float d) {
    uint32_t u;
    memcpy(&u, &d, 4);
    u &= 0x7FFFFFFFu;
    return u > 0x7F800000u ? 0x7FC00000u : u;
}

/* U_k(j) for j in [j0, j0 + n) of one Philox key and one lane (0..3): rng.uniforms, vectorized */
void fm_uniforms(uint64_t seed, int64_t j0, int64_t n, int lane, float *out, int threads) {
    const int64_t nblk = (n + FM_BLOCK - 1) / FM_BLOCK;
#pragma omp parallel num_threads(threads)
    {
        float u[4][FM_BLOCK];
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t s = blk * FM_BLOCK;
            const int cnt = block_count(n, s);
            philox_block(seed, j0 + s, cnt, u[0], u[1], u[2], u[3]);
            memcpy(out + s, u[lane & 3], sizeof(float) * cnt);
        }
    }
}

/* Stable LSD radix sort of v[0..m) by the upper 32 bits (the key; the lower 32 bits hold the
 * index, so equal keys stay in index order: torch's stable argsort). Three digits of 11, 11 and
 * 10 bits; a digit that all keys share is skipped. Returns the sorted array (v or tmp). */
static uint64_t *sp_sort(uint64_t *v, uint64_t *tmp, int64_t m) {
    static const int shift[3] = {32, 43, 54};
    static const int width[3] = {11, 11, 10};
    uint32_t hist[3][2048];
    memset(hist, 0, sizeof(hist));
    for (int64_t i = 0; i < m; i++) {
        const uint64_t x = v[i];
        hist[0][(x >> 32) & 2047u]++;
        hist[1][(x >> 43) & 2047u]++;
        hist[2][(x >> 54) & 1023u]++;
    }
    for (int d = 0; d < 3; d++) {
        const uint32_t mask = (1u << width[d]) - 1u;
        uint32_t *h = hist[d];
        if (h[(v[0] >> shift[d]) & mask] == (uint32_t)m) continue; /* one bucket: order unchanged */
        uint32_t sum = 0;
        for (uint32_t b = 0; b <= mask; b++) { const uint32_t c = h[b]; h[b] = sum; sum += c; }
        for (int64_t i = 0; i < m; i++) {
            const uint64_t x = v[i];
            tmp[h[(x >> shift[d]) & mask]++] = x;
        }
        uint64_t *t = v; v = tmp; tmp = t;
    }
    return v;
}

/* load one fp32 delta row [s, s + cnt) of model m (base NULL: zero) */
static void sp_delta(const fm_sp_params *p, int m, int64_t s, int64_t cnt, float *restrict d, float *restrict b) {
    for (int64_t o = 0; o < cnt; o += FM_BLOCK) {
        const int c = (int)((cnt - o) < FM_BLOCK ? (cnt - o) : FM_BLOCK);
        load_block(p->x[m], p->dtype_x[m], s + o, c, d + o);
        if (p->base) {
            load_block(p->base, p->dtype_base, s + o, c, b);
            for (int i = 0; i < c; i++) d[o + i] = d[o + i] - b[i];
        }
    }
}

/* DELLA's MAGPRUNE keep bits and l1 sums (methods_math.della_keep, _l1_rescaled); sets rows to -1
 * when a thread could not allocate its row buffers (the caller then falls back). Per row, the
 * stable rank r of |delta| (0 .. cols-1), p = lo + ((r / (cols - 1)) * 2) * eps in fp32 (0.5 for
 * r / (cols - 1) when cols == 1), kept where U_m(j) < p; U from Philox of the element's flat index
 * within its chunk, lane m % 4 of group m / 4. */
void fm_della_bits(fm_sp_params *p) {
    const int K = p->k;
    const int64_t cols = p->cols, rows = p->rows;
    int failed = 0;
    for (int m = 0; m < K; m++) p->total[m] = p->kept[m] = 0.0;
    /* per row and model (all, kept): rows go to threads dynamically, so the sums are added in row
     * order after the loop, never in the order threads reach them */
    double *rs = calloc((size_t)rows * (size_t)K * 2, sizeof(double));
    if (!rs) {
        p->rows = -1;
        return;
    }
#pragma omp parallel num_threads(p->threads)
    {
        float *u = malloc(sizeof(float) * 4 * (size_t)p->ngroups * (size_t)cols);
        float *d = malloc(sizeof(float) * (size_t)cols);
        float *prob = malloc(sizeof(float) * (size_t)cols);
        uint64_t *v = malloc(sizeof(uint64_t) * (size_t)cols);
        uint64_t *tmp = malloc(sizeof(uint64_t) * (size_t)cols);
        float b[FM_BLOCK];
        const float denom = (float)(cols - 1);
        const int ok = u && d && prob && v && tmp;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t row = 0; row < rows; row++) {
            if (!ok) continue;
            const int64_t s = row * cols;
            uint8_t *restrict bits = p->bits + s;
            for (int64_t i = 0; i < cols; i++) bits[i] = 0;
            int need = 0;
            for (int m = 0; m < K; m++) need |= p->mode[m] == 2;
            if (need) {
                for (int g = 0; g < p->ngroups; g++) {
                    float *ug = u + (size_t)4 * g * cols;
                    for (int64_t a = s; a < s + cols;) {
                        const int64_t c = a / p->chunk, end = (c + 1) * p->chunk;
                        int64_t e = s + cols < end ? s + cols : end;
                        if (e - a > (1 << 20)) e = a + (1 << 20);
                        const int64_t o = a - s;
                        philox_block(p->seeds[c * p->ngroups + g], a - c * p->chunk, (int)(e - a),
                                     ug + o, ug + cols + o, ug + 2 * cols + o, ug + 3 * cols + o);
                        a = e;
                    }
                }
            }
            for (int m = 0; m < K; m++) {
                if (p->mode[m] == 0) {
                    for (int64_t i = 0; i < cols; i++) bits[i] |= (uint8_t)(1u << m);
                    continue;
                }
                if (p->mode[m] == 1) continue;
                sp_delta(p, m, s, cols, d, b);
                for (int64_t i = 0; i < cols; i++) v[i] = ((uint64_t)sp_abs_key(d[i]) << 32) | (uint64_t)i;
                const uint64_t *sorted = sp_sort(v, tmp, cols);
                const float lo = p->lo[m], eps = p->eps[m];
                for (int64_t r = 0; r < cols; r++) {
                    float rr;
                    if (cols == 1) {
                        rr = 0.5f;
                    } else {
                        rr = (float)r / denom;
                        rr = rr < 0.0f ? 0.0f : (rr > 1.0f ? 1.0f : rr);
                    }
                    prob[(uint32_t)sorted[r]] = lo + (rr * 2.0f) * eps;
                }
                const float *restrict um = u + (size_t)(4 * (m / 4) + (m % 4)) * cols;
                double rt = 0.0, rk = 0.0;
                for (int64_t i = 0; i < cols; i++) {
                    const int keep = um[i] < prob[i];
                    const double a = fabsf(d[i]);
                    bits[i] |= (uint8_t)(keep << m);
                    rt += a;
                    rk += keep ? a : 0.0;
                }
                rs[((size_t)row * K + m) * 2] = rt;
                rs[((size_t)row * K + m) * 2 + 1] = rk;
            }
        }
        free(u); free(d); free(prob); free(v); free(tmp);
    }
    for (int64_t row = 0; row < rows; row++)
        for (int m = 0; m < K; m++) {
            p->total[m] += rs[((size_t)row * K + m) * 2];
            p->kept[m] += rs[((size_t)row * K + m) * 2 + 1];
        }
    free(rs);
    if (failed) p->rows = -1; /* out of memory for a thread's row buffers: nothing usable written */
}

/* keys[i] = sp_abs_key(x_m[i] - base[i]) for the whole tensor (breadcrumbs' band select) */
void fm_sp_abs_keys(const fm_sp_params *p, int m, uint32_t *keys) {
    const int64_t nblk = (p->n + FM_BLOCK - 1) / FM_BLOCK;
#pragma omp parallel num_threads(p->threads)
    {
        float d[FM_BLOCK], b[FM_BLOCK];
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t s = blk * FM_BLOCK;
            const int cnt = block_count(p->n, s);
            sp_delta(p, m, s, cnt, d, b);
            for (int i = 0; i < cnt; i++) keys[s + i] = sp_abs_key(d[i]);
        }
    }
}

/* Keys as fp32 |values| (sce's |var|): canonical ordered bits */
void fm_sp_f32_keys(const float *x, int64_t n, uint32_t *keys) {
    for (int64_t i = 0; i < n; i++) keys[i] = sp_abs_key(x[i]);
}

/* Elements of rank [start, end) in the order (key descending, index ascending), as bit m of
 * bits (K <= 8) or as 1/0 bytes (m < 0): top(end) minus top(start), where top(R) is every key
 * above hi_key[.] plus the first need[.] (by index) equal to it; R = 0 is no element (need -1).
 * Returns sum of the kept keys' values in double when sums is not NULL (sums[0] all, sums[1] kept). */
void fm_sp_band_bits(const uint32_t *keys, int64_t n, uint32_t t_end, int64_t need_end, uint32_t t_start,
                     int64_t need_start, int m, uint8_t *bits, double *sums) {
    int64_t c_end = 0, c_start = 0;
    double tot = 0.0, kept = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t key = keys[i];
        int in_end = 0, in_start = 0;
        if (need_end >= 0) in_end = key > t_end || (key == t_end && c_end++ < need_end);
        if (need_start >= 0) in_start = key > t_start || (key == t_start && c_start++ < need_start);
        const int keep = in_end && !in_start;
        if (m >= 0) bits[i] |= (uint8_t)(keep << m);
        else bits[i] = (uint8_t)keep;
        if (sums) {
            float a;
            memcpy(&a, &key, 4);
            tot += a;
            kept += keep ? (double)a : 0.0;
        }
    }
    if (sums) { sums[0] = tot; sums[1] = kept; }
}

/* methods_math._combine over kept deltas: v_m = ((keep ? d : 0) [* scale]) * w, then sum or TIES
 * sum consensus (agree = sign(v) == sigma, as a 1/0 float multiplied in), normalize, lambda,
 * base + mixed; every sum over models in model order from 0, as torch's sum(dim=0). */
void fm_sp_combine(const fm_sp_params *p) {
    const int K = p->k;
    const int64_t nblk = (p->n + FM_BLOCK - 1) / FM_BLOCK;
#pragma omp parallel num_threads(p->threads)
    {
        float b[FM_BLOCK], d[FM_BLOCK], sgn[FM_BLOCK], mixed[FM_BLOCK], div[FM_BLOCK];
        fm_scratch *w = thread_scratch();
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t s = blk * FM_BLOCK;
            const int cnt = block_count(p->n, s);
            const uint8_t *restrict bits = p->bits + s;
            if (p->base) load_block(p->base, p->dtype_base, s, cnt, b);
            else for (int i = 0; i < cnt; i++) b[i] = 0.0f;
            for (int i = 0; i < cnt; i++) { sgn[i] = 0.0f; mixed[i] = 0.0f; div[i] = 0.0f; }
            for (int m = 0; m < K; m++) {
                float *restrict vm = w->v[m];
                const float sc = p->scale[m], wt = p->weight[m];
                load_block(p->x[m], p->dtype_x[m], s, cnt, d);
                for (int i = 0; i < cnt; i++) d[i] = d[i] - b[i];
                for (int i = 0; i < cnt; i++) vm[i] = ((bits[i] >> m) & 1u) ? d[i] : 0.0f;
                if (sc != 1.0f) for (int i = 0; i < cnt; i++) vm[i] = vm[i] * sc;
                for (int i = 0; i < cnt; i++) vm[i] = vm[i] * wt;
                for (int i = 0; i < cnt; i++) sgn[i] = sgn[i] + vm[i];
            }
            if (p->consensus == CS_SUM) {
                for (int m = 0; m < K; m++) {
                    const float *restrict vm = w->v[m];
                    const float wt = p->weight[m];
                    for (int i = 0; i < cnt; i++) {
                        const float sigma = sgn[i] >= 0.0f ? 1.0f : -1.0f;
                        const float agree = (vm[i] > 0.0f && sigma > 0.0f) || (vm[i] < 0.0f && sigma < 0.0f) ? 1.0f : 0.0f;
                        mixed[i] = mixed[i] + vm[i] * agree;
                        div[i] = div[i] + wt * agree;
                    }
                }
                for (int i = 0; i < cnt; i++) div[i] = div[i] == 0.0f ? 1.0f : div[i];
            } else {
                for (int i = 0; i < cnt; i++) { mixed[i] = sgn[i]; div[i] = p->div_none; }
            }
            if (p->normalize) for (int i = 0; i < cnt; i++) mixed[i] = mixed[i] / div[i];
            if (p->lambda_ != 1.0f) for (int i = 0; i < cnt; i++) mixed[i] = mixed[i] * p->lambda_;
            for (int i = 0; i < cnt; i++) p->out[s + i] = b[i] + mixed[i];
        }
    }
}

/* sce's torch.var(task_vectors, dim=0, unbiased=False) of K fp32 rows of n (the task vectors at
 * row stride n), as torch's CPU reduction computes it per element: Welford in double over the
 * rows in order, var = m2 / K cast to fp32. */
void fm_sp_var_rows(const float *tv, int64_t k, int64_t n, float *var, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        double mean = 0.0, m2 = 0.0;
        for (int64_t r = 0; r < k; r++) {
            const double x = tv[r * n + i];
            const double nf = (double)(r + 1);
            const double delta = x - mean;
            mean = mean + delta / nf;
            m2 = m2 + delta * (x - mean);
        }
        var[i] = (float)(m2 / (double)k);
    }
}

/* sce after its select and energy weights (methods_math.sce), K <= 4 task vectors tv [K][n] in
 * fp32: sigma = sum_k tv_k >= 0 ? 1 : -1, wa_k = w_k * (sign(tv_k) == sigma), out = base +
 * (sum_k tv_k * wa_k) / max(sum_k wa_k, 1e-6) (NaN kept, as torch's clamp), each sum from 0 in
 * model order. */
void fm_sp_sce_combine(const float *tv, int64_t k, int64_t n, const float *w, const void *base, int dtype_base,
                       float *out, int threads) {
    const int64_t nblk = (n + FM_BLOCK - 1) / FM_BLOCK;
#pragma omp parallel num_threads(threads)
    {
        float b[FM_BLOCK], sg[FM_BLOCK], num[FM_BLOCK], den[FM_BLOCK];
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t s = blk * FM_BLOCK;
            const int cnt = block_count(n, s);
            load_block(base, dtype_base, s, cnt, b);
            for (int i = 0; i < cnt; i++) { sg[i] = 0.0f; num[i] = 0.0f; den[i] = 0.0f; }
            for (int64_t m = 0; m < k; m++) {
                const float *restrict t = tv + m * n + s;
                for (int i = 0; i < cnt; i++) sg[i] = sg[i] + t[i];
            }
            for (int64_t m = 0; m < k; m++) {
                const float *restrict t = tv + m * n + s;
                const float wm = w[m];
                for (int i = 0; i < cnt; i++) {
                    const float sigma = sg[i] >= 0.0f ? 1.0f : -1.0f;
                    const float agree = (t[i] > 0.0f && sigma > 0.0f) || (t[i] < 0.0f && sigma < 0.0f) ? 1.0f : 0.0f;
                    const float wa = wm * agree;
                    num[i] = num[i] + t[i] * wa;
                    den[i] = den[i] + wa;
                }
            }
            for (int i = 0; i < cnt; i++) {
                const float d = den[i] != den[i] ? den[i] : (den[i] < 1e-6f ? 1e-6f : den[i]);
                out[s + i] = b[i] + num[i] / d;
            }
        }
    }
}
