/* The RWKV-7 forward pass of a batch on the CPU, one layer per call, in float32 arithmetic with
 * float32, int8 or bf16 weights (int8: one scale per output row, multiplied in after the row's
 * sum). On a CPU with AVX-512 VNNI the int8 products take 8-bit inputs too (one scale per input
 * row and block of KB columns) and sum in 32-bit integers, the way llama.cpp's q8_0 does: the int8
 * weights are then read as they are, four columns to an instruction, instead of widened to float32
 * first. With AVX-512 BF16, bf16 weights (cpu bf16; built without it, such a model runs PyTorch)
 * multiply inputs rounded to bf16, two columns to an instruction, exactly, summed in float32.
 *
 * Built and loaded by engine/native.py (the C compiler at hand, -O3 -march=native -fopenmp; the
 * OpenMP runtime is the one torch has loaded, so torch and these loops share one thread team).
 * The math is engine/models/rwkv7.py's, which is the rwkv package's RWKV_x070; the point of this
 * file is to do a step in a dozen parallel regions instead of hundreds of small torch calls, and
 * to read every weight once per step whatever the batch (a decode step is bound by memory).
 *
 * Every output element is summed in a fixed order that depends neither on the batch size nor on
 * the other rows of the batch nor on the number of threads, so a sequence's results are the same
 * bits alone or in any batch (the engine's exact restores rely on that).
 *
 * At the end, rwkv7_topk: the batched sampler's top-k (and argmax) of each row, in one pass.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RWKV_AVX2 1
#else
#define RWKV_AVX2 0
#endif
#if RWKV_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define RWKV_VNNI 1
#else
#define RWKV_VNNI 0
#endif
#if RWKV_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define RWKV_BF16 1
#else
#define RWKV_BF16 0
#endif

enum { LAYOUT_PANELS = 0, LAYOUT_VNNI = 1, LAYOUT_BF16 = 2 };

typedef struct {
    const void *w;      /* LAYOUT_PANELS: [ceil(rows / 16), cols, 16] (panels of 16 rows,
                           zero-padded), float32, or int8 where scale is set; LAYOUT_VNNI: the
                           int8 weights plus 128 as unsigned bytes [ceil(rows / 16),
                           ceil(cols / 4), 16, 4]; LAYOUT_BF16: bf16 [ceil(rows / 16),
                           ceil(cols / 2), 16, 2] */
    const float *scale; /* [rows]: the scale of each int8 row; NULL for float32 and bf16 */
    int64_t rows, cols;
    int64_t layout;     /* VNNI: products on 8-bit inputs; BF16: on bf16 inputs */
} Mat;

typedef struct {
    /* vectors [C] unless noted */
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const float *mix;                       /* [6, C]: x_r, x_w, x_k, x_v, x_a, x_g */
    const float *w0, *a0, *v0;              /* v0 NULL in layer 0 */
    const float *k_k, *k_a, *r_k;           /* r_k [H * N] */
    const float *ln_x_w, *ln_x_b;
    const float *ffn_x_k;
    Mat receptance, key, value, output, ffn_key, ffn_value;
    /* the LoRA matrices, transposed to [out, in] float32 */
    Mat w1, w2, a1, a2, g1, g2, v1, v2;     /* v1, v2 rows 0 in layer 0 */
} Layer;

enum { EPI_SET = 0, EPI_TANH = 1, EPI_SIGMOID = 2, EPI_RELU_SQ = 3, EPI_ADD = 4 };

/* an input rounded for the products on 8-bit inputs (VNNI), per row and block of KB columns:
 * q = x / s rounded (s = the block's largest magnitude / 127), with base = -128 * the block's sum
 * of q (the weights are stored plus 128: a sum starting at base comes out as the sum of q * w); or
 * for the bf16 products, each x rounded to bf16 (q only) */
typedef struct {
    const void *q;       /* [M, stride] int8 or bf16: the row's columns, zero-padded to a multiple of KB */
    const float *s;      /* [M, blocks] */
    const int32_t *base; /* [M, blocks] */
    int64_t stride, blocks;
} QIn;

typedef struct {
    const Mat *m;
    const float *x; /* [M, m->cols] */
    float *y;       /* [M, m->rows] */
    int epi;
    QIn qin;        /* m->layout VNNI or BF16: x rounded (run_jobs) */
} Job;

int rwkv7_native_version(void) { return 7; }

/* what the build has: 1 AVX2, | 2 AVX-512 VNNI (int8 products on 8-bit inputs), | 4 AVX-512 BF16
 * (bf16 products); 0: portable C */
int rwkv7_native_simd(void) { return RWKV_AVX2 | RWKV_VNNI << 1 | RWKV_BF16 << 2; }

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

static inline float activation(int epi, float v) {
    switch (epi) {
    case EPI_TANH: return tanhf(v);
    case EPI_SIGMOID: return sigmoidf(v);
    case EPI_RELU_SQ: return v > 0.0f ? v * v : 0.0f;
    default: return v;
    }
}

#define P 16    /* rows of a panel: a weight is stored [ceil(rows / P), cols, P] */
#define GROUP 4 /* panels of a unit of work */
#define MR 6    /* input rows of a tile */
#define KB 64   /* columns summed in one chain before joining the total */
#define WIDEN_MAX (256 << 10) /* bytes of a widened int8 panel, at most */

#if RWKV_AVX2
/* the two weight vectors held in registers: left to itself the compiler reads them again from
 * memory in every multiply-add, and a tile of 3 to 5 inputs then waits on loads (measured 65-72
 * against 91 GFLOP/s a core for 6 inputs) */
#define KEEP(a, b) __asm__("" : "+x"(a), "+x"(b))
#define LOAD_F32(w, k, w0, w1)                                                                      \
    do {                                                                                            \
        const float *f_ = (const float *)(w) + (k) * P;                                             \
        w0 = _mm256_loadu_ps(f_);                                                                   \
        w1 = _mm256_loadu_ps(f_ + 8);                                                               \
        KEEP(w0, w1);                                                                               \
    } while (0)
#define LOAD_I8(w, k, w0, w1)                                                                       \
    do {                                                                                            \
        const int8_t *q_ = (const int8_t *)(w) + (k) * P;                                           \
        w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q_)));        \
        w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q_ + 8))));  \
    } while (0)

/* out[b * P + r] = panel row r . x[b] for NM inputs: per output, one fused multiply-add per column
 * in column order within blocks of KB columns, each block's sum then added to the total (float32
 * sums over thousands of columns in one chain lose more than the rwkv package's products do); the
 * same operations for every output whatever NM is */
#define DEFINE_PANEL(NM, SUF, LOAD)                                                                 \
    static void panel_##SUF##_##NM(const void *w, int64_t K, const float *const *xs, float *out,     \
                                   const char *pf, int64_t pf_step) {                               \
        for (int b = 0; b < NM; b++) {                                                              \
            _mm256_storeu_ps(out + b * P, _mm256_setzero_ps());                                     \
            _mm256_storeu_ps(out + b * P + 8, _mm256_setzero_ps());                                 \
        }                                                                                           \
        for (int64_t k0 = 0; k0 < K; k0 += KB) {                                                    \
            const int64_t k1 = k0 + KB < K ? k0 + KB : K;                                           \
            __m256 a0[NM], a1[NM];                                                                  \
            for (int b = 0; b < NM; b++) a0[b] = a1[b] = _mm256_setzero_ps();                       \
            for (int64_t k = k0; k < k1; k++) {                                                     \
                __m256 w0, w1;                                                                      \
                if (pf) _mm_prefetch(pf + k * pf_step, _MM_HINT_T1);                                \
                LOAD(w, k, w0, w1);                                                                 \
                for (int b = 0; b < NM; b++) {                                                      \
                    __m256 xb = _mm256_broadcast_ss(xs[b] + k);                                     \
                    a0[b] = _mm256_fmadd_ps(w0, xb, a0[b]);                                         \
                    a1[b] = _mm256_fmadd_ps(w1, xb, a1[b]);                                         \
                }                                                                                   \
            }                                                                                       \
            for (int b = 0; b < NM; b++) {                                                          \
                _mm256_storeu_ps(out + b * P, _mm256_add_ps(_mm256_loadu_ps(out + b * P), a0[b]));  \
                _mm256_storeu_ps(out + b * P + 8,                                                   \
                                 _mm256_add_ps(_mm256_loadu_ps(out + b * P + 8), a1[b]));           \
            }                                                                                       \
        }                                                                                           \
    }
/* GROUP panels at once for one input (a decode step of one sequence: more sums in flight), with
 * the same operations per output as the panel tiles */
#define DEFINE_GROUP(SUF, LOAD, ESIZE)                                                              \
    static void group_##SUF(const void *w, int64_t K, const float *x, float *out) {                 \
        for (int i = 0; i < 2 * GROUP; i++) _mm256_storeu_ps(out + 8 * i, _mm256_setzero_ps());     \
        for (int64_t k0 = 0; k0 < K; k0 += KB) {                                                    \
            const int64_t k1 = k0 + KB < K ? k0 + KB : K;                                           \
            __m256 a[2 * GROUP];                                                                    \
            for (int i = 0; i < 2 * GROUP; i++) a[i] = _mm256_setzero_ps();                         \
            for (int64_t k = k0; k < k1; k++) {                                                     \
                __m256 xb = _mm256_broadcast_ss(x + k);                                             \
                for (int g = 0; g < GROUP; g++) {                                                   \
                    __m256 w0, w1;                                                                  \
                    LOAD((const char *)(w) + (int64_t)g * K * P * (ESIZE), k, w0, w1);              \
                    a[2 * g] = _mm256_fmadd_ps(w0, xb, a[2 * g]);                                   \
                    a[2 * g + 1] = _mm256_fmadd_ps(w1, xb, a[2 * g + 1]);                           \
                }                                                                                   \
            }                                                                                       \
            for (int i = 0; i < 2 * GROUP; i++)                                                     \
                _mm256_storeu_ps(out + 8 * i, _mm256_add_ps(_mm256_loadu_ps(out + 8 * i), a[i]));   \
        }                                                                                           \
    }
#define DEFINE_ALL(SUF, LOAD, ESIZE)                                                                \
    DEFINE_PANEL(1, SUF, LOAD)                                                                      \
    DEFINE_PANEL(2, SUF, LOAD)                                                                      \
    DEFINE_PANEL(3, SUF, LOAD)                                                                      \
    DEFINE_PANEL(4, SUF, LOAD)                                                                      \
    DEFINE_PANEL(5, SUF, LOAD)                                                                      \
    DEFINE_PANEL(6, SUF, LOAD)                                                                      \
    DEFINE_GROUP(SUF, LOAD, ESIZE)                                                                  \
    static void panel_##SUF(int nm, const void *w, int64_t K, const float *const *xs, float *out,   \
                            const char *pf, int64_t pf_step) {                                      \
        switch (nm) {                                                                               \
        case 1: panel_##SUF##_1(w, K, xs, out, pf, pf_step); break;                                 \
        case 2: panel_##SUF##_2(w, K, xs, out, pf, pf_step); break;                                 \
        case 3: panel_##SUF##_3(w, K, xs, out, pf, pf_step); break;                                 \
        case 4: panel_##SUF##_4(w, K, xs, out, pf, pf_step); break;                                 \
        case 5: panel_##SUF##_5(w, K, xs, out, pf, pf_step); break;                                 \
        default: panel_##SUF##_6(w, K, xs, out, pf, pf_step); break;                                \
        }                                                                                           \
    }
DEFINE_ALL(f32, LOAD_F32, 4)
DEFINE_ALL(i8, LOAD_I8, 1)
#if RWKV_VNNI || RWKV_BF16
/* panel_KIND(nm, ...): the tile of nm inputs (1 to MR) of the VNNI or bf16 products */
#define DEFINE_DISPATCH(KIND, WT)                                                                   \
    static void panel_##KIND(int nm, const WT *w, int64_t K, const QIn *qs, const int64_t *rows,     \
                             float *out, const char *pf, int64_t pf_step) {                         \
        switch (nm) {                                                                               \
        case 1: panel_##KIND##_1(w, K, qs, rows, out, pf, pf_step); break;                          \
        case 2: panel_##KIND##_2(w, K, qs, rows, out, pf, pf_step); break;                          \
        case 3: panel_##KIND##_3(w, K, qs, rows, out, pf, pf_step); break;                          \
        case 4: panel_##KIND##_4(w, K, qs, rows, out, pf, pf_step); break;                          \
        case 5: panel_##KIND##_5(w, K, qs, rows, out, pf, pf_step); break;                          \
        default: panel_##KIND##_6(w, K, qs, rows, out, pf, pf_step); break;                         \
        }                                                                                           \
    }
#endif
#if RWKV_VNNI
static inline __m512i bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm512_set1_epi32(v);
}
/* the int8 products on 8-bit inputs: per output and block, the integer sum of q * w (exact, so in
 * any order), then total += (float)sum * s in block order; the same operations whatever NM is */
#define DEFINE_PANEL_VNNI(NM)                                                                       \
    static void panel_vnni_##NM(const uint8_t *w, int64_t K4, const QIn *qs, const int64_t *rows,  \
                                float *out, const char *pf, int64_t pf_step) {                      \
        __m512 tot[NM];                                                                             \
        for (int b = 0; b < NM; b++) tot[b] = _mm512_setzero_ps();                                  \
        for (int64_t blk = 0, k0 = 0; k0 < K4; blk++, k0 += KB) {                                   \
            const int64_t k1 = k0 + KB < K4 ? k0 + KB : K4;                                         \
            __m512i acc[NM];                                                                        \
            const int8_t *xq[NM];                                                                   \
            for (int b = 0; b < NM; b++) {                                                          \
                acc[b] = _mm512_set1_epi32(qs->base[rows[b] * qs->blocks + blk]);                   \
                xq[b] = (const int8_t *)qs->q + rows[b] * qs->stride;                               \
            }                                                                                       \
            for (int64_t k = k0; k < k1; k += 4) {                                                  \
                if (pf) _mm_prefetch(pf + k * pf_step, _MM_HINT_T1);                                \
                const __m512i wv = _mm512_loadu_si512((const void *)(w + k * P));                   \
                for (int b = 0; b < NM; b++) acc[b] = _mm512_dpbusd_epi32(acc[b], wv, bcast4(xq[b] + k)); \
            }                                                                                       \
            for (int b = 0; b < NM; b++)                                                            \
                tot[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[b]),                                 \
                                         _mm512_set1_ps(qs->s[rows[b] * qs->blocks + blk]), tot[b]); \
        }                                                                                           \
        for (int b = 0; b < NM; b++) _mm512_storeu_ps(out + b * P, tot[b]);                         \
    }
DEFINE_PANEL_VNNI(1)
DEFINE_PANEL_VNNI(2)
DEFINE_PANEL_VNNI(3)
DEFINE_PANEL_VNNI(4)
DEFINE_PANEL_VNNI(5)
DEFINE_PANEL_VNNI(6)
DEFINE_DISPATCH(vnni, uint8_t)
/* GROUP panels for input row 0 (one sequence's decode step), the same operations per output */
static void group_vnni(const uint8_t *w, int64_t K4, const QIn *qs, float *out) {
    __m512 tot[GROUP];
    for (int g = 0; g < GROUP; g++) tot[g] = _mm512_setzero_ps();
    for (int64_t blk = 0, k0 = 0; k0 < K4; blk++, k0 += KB) {
        const int64_t k1 = k0 + KB < K4 ? k0 + KB : K4;
        __m512i acc[GROUP];
        const __m512i base = _mm512_set1_epi32(qs->base[blk]);
        for (int g = 0; g < GROUP; g++) acc[g] = base;
        for (int64_t k = k0; k < k1; k += 4) {
            const __m512i xb = bcast4((const int8_t *)qs->q + k);
            for (int g = 0; g < GROUP; g++)
                acc[g] = _mm512_dpbusd_epi32(acc[g], _mm512_loadu_si512((const void *)(w + (g * K4 + k) * P)), xb);
        }
        const __m512 sb = _mm512_set1_ps(qs->s[blk]);
        for (int g = 0; g < GROUP; g++) tot[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[g]), sb, tot[g]);
    }
    for (int g = 0; g < GROUP; g++) _mm512_storeu_ps(out + g * P, tot[g]);
}
#endif
#if RWKV_BF16
static inline __m512bh bcast2(const uint16_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return (__m512bh)_mm512_set1_epi32(v);
}
static inline __m512bh load_bf16(const uint16_t *w) { return (__m512bh)_mm512_loadu_si512((const void *)w); }
/* the bf16 products: per output, pairs of columns multiplied exactly and summed in float32, in
 * column order within blocks of KB columns, each block's sum then added to the total (as the
 * float32 tiles do); the same operations whatever NM is */
#define DEFINE_PANEL_BF16(NM)                                                                       \
    static void panel_bf16_##NM(const uint16_t *w, int64_t K2, const QIn *qs, const int64_t *rows,  \
                                float *out, const char *pf, int64_t pf_step) {                      \
        __m512 tot[NM];                                                                             \
        const uint16_t *xs[NM];                                                                     \
        for (int b = 0; b < NM; b++) {                                                              \
            tot[b] = _mm512_setzero_ps();                                                           \
            xs[b] = (const uint16_t *)qs->q + rows[b] * qs->stride;                                 \
        }                                                                                           \
        for (int64_t k0 = 0; k0 < K2; k0 += KB) {                                                   \
            const int64_t k1 = k0 + KB < K2 ? k0 + KB : K2;                                         \
            __m512 acc[NM];                                                                         \
            for (int b = 0; b < NM; b++) acc[b] = _mm512_setzero_ps();                              \
            for (int64_t k = k0; k < k1; k += 2) {                                                  \
                if (pf) _mm_prefetch(pf + k * pf_step, _MM_HINT_T1);                                \
                const __m512bh wv = load_bf16(w + k * P);                                           \
                for (int b = 0; b < NM; b++) acc[b] = _mm512_dpbf16_ps(acc[b], wv, bcast2(xs[b] + k)); \
            }                                                                                       \
            for (int b = 0; b < NM; b++) tot[b] = _mm512_add_ps(tot[b], acc[b]);                    \
        }                                                                                           \
        for (int b = 0; b < NM; b++) _mm512_storeu_ps(out + b * P, tot[b]);                         \
    }
DEFINE_PANEL_BF16(1)
DEFINE_PANEL_BF16(2)
DEFINE_PANEL_BF16(3)
DEFINE_PANEL_BF16(4)
DEFINE_PANEL_BF16(5)
DEFINE_PANEL_BF16(6)
DEFINE_DISPATCH(bf16, uint16_t)
/* GROUP panels for input row 0 (one sequence's decode step), the same operations per output */
static void group_bf16(const uint16_t *w, int64_t K2, const QIn *qs, float *out) {
    __m512 tot[GROUP];
    const uint16_t *x = (const uint16_t *)qs->q;
    for (int g = 0; g < GROUP; g++) tot[g] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K2; k0 += KB) {
        const int64_t k1 = k0 + KB < K2 ? k0 + KB : K2;
        __m512 acc[GROUP];
        for (int g = 0; g < GROUP; g++) acc[g] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 2) {
            const __m512bh xb = bcast2(x + k);
            for (int g = 0; g < GROUP; g++) acc[g] = _mm512_dpbf16_ps(acc[g], load_bf16(w + (g * K2 + k) * P), xb);
        }
        for (int g = 0; g < GROUP; g++) tot[g] = _mm512_add_ps(tot[g], acc[g]);
    }
    for (int g = 0; g < GROUP; g++) _mm512_storeu_ps(out + g * P, tot[g]);
}
#endif
#else
/* without AVX2: the same order of sums, in plain C */
static void panel_plain(int nm, const Mat *A, const void *w, int64_t K, const float *const *xs, float *out) {
    for (int b = 0; b < nm; b++) {
        float total[P] = {0};
        for (int64_t k0 = 0; k0 < K; k0 += KB) {
            const int64_t k1 = k0 + KB < K ? k0 + KB : K;
            float acc[P] = {0};
            for (int64_t k = k0; k < k1; k++)
                for (int r = 0; r < P; r++) {
                    float wv = A->scale ? (float)((const int8_t *)w)[k * P + r] : ((const float *)w)[k * P + r];
                    acc[r] = fmaf(wv, xs[b][k], acc[r]);
                }
            for (int r = 0; r < P; r++) total[r] += acc[r];
        }
        for (int r = 0; r < P; r++) out[b * P + r] = total[r];
    }
}
#endif

/* y = epilogue(sums [* scale]) for the n outputs of a tile row (n = P but at a matrix's last
 * rows, where a fixed count lets the compiler write each loop as a vector or two) */
#define STORE_LOOP(n, value)                                                                        \
    switch (job->epi) {                                                                             \
    case EPI_ADD:                                                                                   \
        for (int r = 0; r < (n); r++) y[r] += (value);                                              \
        break;                                                                                      \
    case EPI_SET:                                                                                   \
        for (int r = 0; r < (n); r++) y[r] = (value);                                               \
        break;                                                                                      \
    case EPI_RELU_SQ: /* a compare and a select, not a branch per output: the same values */       \
        for (int r = 0; r < (n); r++) {                                                             \
            const float v_ = (value), c_ = v_ > 0.0f ? v_ : 0.0f;                                   \
            y[r] = c_ * c_;                                                                         \
        }                                                                                           \
        break;                                                                                      \
    default:                                                                                        \
        for (int r = 0; r < (n); r++) y[r] = activation(job->epi, (value));                         \
    }

static void store(const Job *job, const Mat *A, int64_t m, int64_t row0, const float *restrict sums) {
    const int64_t N = A->rows;
    float *restrict y = job->y + m * N + row0;
    const float *restrict scale = A->scale ? A->scale + row0 : NULL;
    /* (the output is read only where it is added to: a load of a line not yet in cache stalls,
     * where a store does not) */
    if (N - row0 >= P) {
        if (scale) STORE_LOOP(P, sums[r] * scale[r])
        else STORE_LOOP(P, sums[r])
    } else {
        const int n = (int)(N - row0);
        if (scale) STORE_LOOP(n, sums[r] * scale[r])
        else STORE_LOOP(n, sums[r])
    }
}
#undef STORE_LOOP

/* inputs in the next tile: MR, but never leaving a last tile of fewer than 4 where that can be
 * helped (a tile of 1 to 3 inputs has too few sums in flight to keep the multipliers busy) */
static inline int tile_rows(int64_t left) {
    if (left <= MR) return (int)left;
    if (left < MR + 4) return (int)(left - 4 < 4 ? (left + 1) / 2 : left - 4);
    return MR;
}

#if RWKV_AVX2
/* this thread's buffer for a widened panel (grown, never freed: one per OpenMP thread) */
static float *widened(int64_t floats) {
    static __thread float *buffer = NULL;
    static __thread int64_t capacity = 0;
    if (capacity < floats) {
        free(buffer);
        buffer = (float *)aligned_alloc(64, (size_t)((floats * 4 + 63) / 64 * 64));
        capacity = buffer ? floats : 0;
    }
    return buffer;
}
#endif

/* one unit of work: GROUP panels (fewer at the end) for every input row */
static void mat_block(const Job *job, int64_t M, int64_t unit) {
    const Mat *A = job->m;
    const int64_t K = A->cols, panels = (A->rows + P - 1) / P;
    const int64_t p0 = unit * GROUP, np = panels - p0 < GROUP ? panels - p0 : GROUP;
    const size_t esize = A->scale ? 1 : 4, pstride = (size_t)K * P * esize;
    const char *base = (const char *)A->w + (size_t)p0 * pstride;
    float sums[MR * P > GROUP * P ? MR * P : GROUP * P];
#if RWKV_VNNI || RWKV_BF16
/* the products on rounded inputs (KIND vnni or bf16: weights of type WT, PACK columns of a row
 * together, the columns padded to a multiple of PACK), the same way for both: one sequence's
 * GROUP panels at once, else each panel for tiles of up to MR inputs */
#define ROUNDED_PRODUCTS(KIND, WT, PACK)                                                            \
    do {                                                                                            \
        const int64_t Kp = (K + PACK - 1) / PACK * PACK;                                            \
        const size_t rstride = (size_t)Kp * P;                                                      \
        const WT *rbase = (const WT *)A->w + (size_t)p0 * rstride;                                  \
        if (M == 1 && np == GROUP) {                                                                \
            group_##KIND(rbase, Kp, &job->qin, sums);                                               \
            for (int g = 0; g < GROUP; g++) store(job, A, 0, (p0 + g) * P, sums + g * P);           \
            return;                                                                                 \
        }                                                                                           \
        for (int64_t p = 0; p < np; p++) {                                                          \
            const WT *w = rbase + (size_t)p * rstride;                                              \
            for (int64_t m0 = 0; m0 < M;) {                                                         \
                const int nm = tile_rows(M - m0);                                                   \
                int64_t rows[MR];                                                                   \
                for (int b = 0; b < nm; b++) rows[b] = m0 + b;                                      \
                const char *pf = m0 == 0 && p0 + p + 1 < panels ? (const char *)(w + rstride) : NULL; \
                panel_##KIND(nm, w, Kp, &job->qin, rows, sums, pf, (int64_t)sizeof(WT) * P);       \
                for (int b = 0; b < nm; b++) store(job, A, m0 + b, (p0 + p) * P, sums + b * P);     \
                m0 += nm;                                                                           \
            }                                                                                       \
        }                                                                                           \
        return;                                                                                     \
    } while (0)
#endif
#if RWKV_BF16
    if (A->layout == LAYOUT_BF16) ROUNDED_PRODUCTS(bf16, uint16_t, 2);
#endif
#if RWKV_VNNI
    if (A->layout == LAYOUT_VNNI) ROUNDED_PRODUCTS(vnni, uint8_t, 4);
#endif
#if RWKV_AVX2
    if (M == 1 && np == GROUP) {
        if (A->scale) group_i8(base, K, job->x, sums);
        else group_f32(base, K, job->x, sums);
        for (int g = 0; g < GROUP; g++) store(job, A, 0, (p0 + g) * P, sums + g * P);
        return;
    }
#endif
#if RWKV_AVX2
    /* int8 with several inputs: each panel widened to float32 once (exactly: the same sums follow)
     * rather than once per tile of inputs, where the widened panel stays in L2 (measured 1.17x at
     * 8 sequences on the 1.5B shape for not widening its 8192-column panels) */
    float *wide = A->scale != NULL && M >= 4 && K * P * 4 <= WIDEN_MAX ? widened(K * P) : NULL;
    const int widen = wide != NULL; /* out of memory: the int8 tiles, slower, same sums */
#endif
    for (int64_t p = 0; p < np; p++) {
        const void *w = base + (size_t)p * pstride;
#if RWKV_AVX2
        if (widen) {
            const int8_t *q = (const int8_t *)w;
            for (int64_t i = 0; i < K * P; i += 16) {
                __m128i v = _mm_loadu_si128((const __m128i *)(q + i));
                _mm256_storeu_ps(wide + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)));
                _mm256_storeu_ps(wide + i + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))));
            }
        }
#endif
        for (int64_t m0 = 0; m0 < M;) {
            const int nm = tile_rows(M - m0);
            const float *xs[MR];
            for (int b = 0; b < nm; b++) xs[b] = job->x + (m0 + b) * K;
#if RWKV_AVX2
            /* while the first tile reads this panel, the next one is fetched into L2 (the tiles
             * after it find this one there) */
            const char *pf = m0 == 0 && p0 + p + 1 < panels ? (const char *)w + pstride : NULL;
            const int64_t step = (int64_t)(pstride / (size_t)K);
            if (widen) panel_f32(nm, wide, K, xs, sums, pf, step);
            else if (A->scale) panel_i8(nm, w, K, xs, sums, pf, step);
            else panel_f32(nm, w, K, xs, sums, pf, step);
#else
            panel_plain(nm, A, w, K, xs, sums);
#endif
            for (int b = 0; b < nm; b++) store(job, A, m0 + b, (p0 + p) * P, sums + b * P);
            m0 += nm;
        }
    }
}

#undef ROUNDED_PRODUCTS

#if RWKV_VNNI
/* row m of x [M, K] quantized for the VNNI products (see QIn) */
static void quantize_row(const float *x, int64_t K, const QIn *qi, int64_t m) {
    int8_t *q = (int8_t *)qi->q + m * qi->stride;
    float *s = (float *)qi->s + m * qi->blocks;
    int32_t *base = (int32_t *)qi->base + m * qi->blocks;
    for (int64_t blk = 0; blk < qi->blocks; blk++) {
        const int64_t k0 = blk * KB, k1 = k0 + KB < K ? k0 + KB : K;
        if (k1 - k0 == KB) { /* a whole block in four vectors: the same roundings as below */
            __m512 v[KB / 16], m = _mm512_setzero_ps();
            for (int i = 0; i < KB / 16; i++) {
                v[i] = _mm512_loadu_ps(x + k0 + 16 * i);
                m = _mm512_max_ps(m, _mm512_abs_ps(v[i]));
            }
            const float amax = _mm512_reduce_max_ps(m);
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m512i total = _mm512_setzero_si512();
            for (int i = 0; i < KB / 16; i++) {
                /* converted in the default rounding mode: to nearest, ties to even (nearbyintf's) */
                __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
                r = _mm512_max_epi32(_mm512_min_epi32(r, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                _mm_storeu_si128((__m128i *)(q + k0 + 16 * i), _mm512_cvtepi32_epi8(r));
                total = _mm512_add_epi32(total, r);
            }
            s[blk] = amax / 127.0f;
            base[blk] = -128 * _mm512_reduce_add_epi32(total);
            continue;
        }
        float amax = 0.0f;
        for (int64_t k = k0; k < k1; k++) amax = fmaxf(amax, fabsf(x[k]));
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int64_t k = k0; k < k1; k++) {
            const float r = nearbyintf(x[k] * inv);
            const int32_t v = r > 127.0f ? 127 : r < -127.0f ? -127 : (int32_t)r;
            q[k] = (int8_t)v;
            sum += v;
        }
        for (int64_t k = k1; k < k0 + KB; k++) q[k] = 0;
        s[blk] = amax / 127.0f;
        base[blk] = -128 * sum;
    }
}

#endif
#if RWKV_BF16
/* row m of x [M, K] rounded to bf16 (to nearest, ties to even) for the bf16 products */
static void bf16_row(const float *x, int64_t K, const QIn *qi, int64_t m) {
    uint16_t *q = (uint16_t *)qi->q + m * qi->stride;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        _mm256_storeu_si256((__m256i *)(q + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + k)));
    if (k < K) {
        const __mmask16 left = (__mmask16)((1u << (K - k)) - 1);
        _mm256_storeu_si256((__m256i *)(q + k), (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(left, x + k)));
        k += 16;
    }
    for (; k < qi->stride; k++) q[k] = 0;
}
#endif

/* bytes of a rounded input row of K columns (QIn: int8 columns, then a scale and a base a block;
 * or bf16 columns) */
static inline int64_t qin_row_bytes(int64_t K) { return (K + KB - 1) / KB * 2 * KB; }

/* bytes of rounded inputs per input row that a layer's (or the head's) jobs take at most: the
 * three large products on the time mix's inputs, or the channel mix's second */
static int64_t qin_bytes(int64_t C, int64_t F) {
#if RWKV_VNNI || RWKV_BF16
    const int64_t three = 3 * qin_row_bytes(C), ffn = qin_row_bytes(F);
    return three > ffn ? three : ffn;
#else
    (void)C, (void)F;
    return 0;
#endif
}

/* all blocks of all jobs, shared among the team (call inside a parallel region); the inputs of
 * products on 8-bit or bf16 inputs are rounded first, into qwork (qin_bytes per row) */
static void run_jobs(Job *jobs, int n, int64_t M, char *qwork) {
#if RWKV_VNNI || RWKV_BF16
    int nq = 0, which[16];
    for (int j = 0; j < n; j++) {
        if (jobs[j].m->layout == LAYOUT_PANELS) continue;
        const int64_t K = jobs[j].m->cols, blocks = (K + KB - 1) / KB;
        QIn *qi = &jobs[j].qin;
        qi->stride = blocks * KB;
        qi->blocks = blocks;
        qi->q = qwork;
        qi->s = (const float *)(qwork + M * qi->stride);
        qi->base = (const int32_t *)(qwork + M * (qi->stride + 4 * blocks));
        qwork += M * qin_row_bytes(K);
        which[nq++] = j;
    }
    if (nq > 0) {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < nq * M; i++) {
            const Job *job = &jobs[which[i / M]];
            const float *x = job->x + (i % M) * job->m->cols;
#if RWKV_BF16
            if (job->m->layout == LAYOUT_BF16) {
                bf16_row(x, job->m->cols, &job->qin, i % M);
                continue;
            }
#endif
#if RWKV_VNNI
            quantize_row(x, job->m->cols, &job->qin, i % M);
#endif
        }
    }
#else
    (void)qwork;
#endif
    int64_t total = 0, starts[16];
    for (int j = 0; j < n; j++) {
        starts[j] = total;
        total += ((jobs[j].m->rows + P - 1) / P + GROUP - 1) / GROUP;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < total; i++) {
        int j = n - 1;
        while (starts[j] > i) j--;
        mat_block(&jobs[j], M, i - starts[j]);
    }
}

/* (sums in double: a few hundred values, and the residual stream grows large in deep models) */
static void layer_norm(const float *x, const float *w, const float *b, int64_t C, float eps, float *out) {
    double sum = 0.0, sq = 0.0;
    for (int64_t i = 0; i < C; i++) sum += x[i];
    const float mean = (float)(sum / (double)C);
    for (int64_t i = 0; i < C; i++) {
        double d = (double)x[i] - (double)mean;
        sq += d * d;
    }
    const float var = (float)(sq / (double)C);
    float inv = 1.0f / sqrtf(var + eps);
    for (int64_t i = 0; i < C; i++) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

/* h = layer_norm(x) per row, then the token shift's mixes out[i] = h + (previous h - h) * mix[i]
 * (the previous token's h: the state at a sequence's first position); call inside a parallel
 * region */
static void norm_and_shift(const float *x, const float *ln_w, const float *ln_b, const float *state, int64_t M,
                           int64_t T, int64_t C, const float *mix, int nmix, float *h, float *out) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) layer_norm(x + m * C, ln_w, ln_b, C, 1e-5f, h + m * C);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *prev = m % T == 0 ? state + (m / T) * C : h + (m - 1) * C;
        const float *hm = h + m * C;
        for (int i = 0; i < nmix; i++) {
            float *o = out + (int64_t)i * M * C + m * C;
            const float *mi = mix + (int64_t)i * C;
            for (int64_t c = 0; c < C; c++) o[c] = hm[c] + (prev[c] - hm[c]) * mi[c];
        }
    }
}

/* floats of scratch space a layer call needs for M rows: M times a count per row (the engine
 * takes it per row) */
int64_t rwkv7_workspace(int64_t M, int64_t C, int64_t F, int64_t lora) {
    return M * (16 * C + F + lora + (qin_bytes(C, F) + 3) / 4);
}

#define DECAY_SCALE (-0.606531f)

/* One layer on x [B, T, C] (updated in place), its states updated in place: shift [B, C], kv
 * [B, H, N, N] (key-major), ffn_shift [B, C]; v_first [B*T, C] is written by layer 0 and read by
 * the others; work: rwkv7_workspace floats. */
void rwkv7_layer(const Layer *L, int layer, int64_t B, int64_t T, int64_t C, int64_t H, int64_t N, int64_t F,
                 float *x, float *shift, float *kv, float *ffn_shift, float *v_first, float *work, int threads) {
    const int64_t M = B * T;
    const int64_t Dw = L->w1.rows, Da = L->a1.rows, Dg = L->g1.rows;
    float *h = work, *xm = h + M * C; /* xm: the six mixes [6][M, C] */
    float *r = xm + 6 * M * C, *k = r + M * C, *v = k + M * C, *wl = v + M * C, *al = wl + M * C;
    float *gl = al + M * C, *vl = gl + M * C, *y = vl + M * C, *ffk = y + M * C;
    float *wd = ffk + M * F, *ad = wd + M * Dw, *gd = ad + M * Da, *vd = gd + M * Dg;
    float *xr = xm, *xw = xm + M * C, *xk = xm + 2 * M * C, *xv = xm + 3 * M * C, *xa = xm + 4 * M * C,
          *xg = xm + 5 * M * C;
    float *h2 = xr, *fx = xw; /* reused after the time mix */
    char *qwork = (char *)(vd + M * L->v1.rows); /* the int8 products' quantized inputs */

#pragma omp parallel num_threads(threads)
    {
        norm_and_shift(x, L->ln1_w, L->ln1_b, shift, M, T, C, L->mix, 6, h, xm);
        {
            Job jobs[7] = {
                {&L->receptance, xr, r, EPI_SET}, {&L->key, xk, k, EPI_SET}, {&L->value, xv, v, EPI_SET},
                {&L->w1, xw, wd, EPI_TANH},       {&L->a1, xa, ad, EPI_SET}, {&L->g1, xg, gd, EPI_SIGMOID},
                {&L->v1, xv, vd, EPI_SET},
            };
            run_jobs(jobs, layer > 0 ? 7 : 6, M, qwork);
        }
        {
            Job jobs[4] = {
                {&L->w2, wd, wl, EPI_SET}, {&L->a2, ad, al, EPI_SET}, {&L->g2, gd, gl, EPI_SET},
                {&L->v2, vd, vl, EPI_SET},
            };
            run_jobs(jobs, layer > 0 ? 4 : 3, M, qwork);
        }
        /* per row: kk (into xk), k, v, a (into al), decay (into wl) */
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            float *km = k + m * C, *vm = v + m * C, *am = al + m * C, *wm = wl + m * C, *kkm = xk + m * C;
            for (int64_t c = 0; c < C; c++) am[c] = sigmoidf(L->a0[c] + am[c]);
            for (int64_t hd = 0; hd < H; hd++) {
                float ss = 0.0f;
                for (int64_t n = 0; n < N; n++) {
                    float t = km[hd * N + n] * L->k_k[hd * N + n];
                    kkm[hd * N + n] = t;
                    ss += t * t;
                }
                float norm = sqrtf(ss);
                float inv = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
                for (int64_t n = 0; n < N; n++) kkm[hd * N + n] *= inv;
            }
            for (int64_t c = 0; c < C; c++) km[c] = km[c] * (1.0f + (am[c] - 1.0f) * L->k_a[c]);
            if (layer == 0) {
                memcpy(v_first + m * C, vm, (size_t)C * sizeof(float));
            } else {
                const float *vf = v_first + m * C, *vlm = vl + m * C;
                for (int64_t c = 0; c < C; c++) vm[c] = vm[c] + (vf[c] - vm[c]) * sigmoidf(L->v0[c] + vlm[c]);
            }
            for (int64_t c = 0; c < C; c++) wm[c] = expf(DECAY_SCALE * sigmoidf(L->w0[c] + wm[c]));
        }
        /* the recurrence, per sequence and head, token by token; y per row */
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t bi = bh / H, hd = bh % H;
            float *S = kv + bh * N * N;
            float sa[256];
            for (int64_t t = 0; t < T; t++) {
                const int64_t m = bi * T + t, o = m * C + hd * N;
                const float *kk = xk + o, *kt = k + o, *vt = v + o, *rt = r + o, *wt = wl + o, *at = al + o;
                float *yt = y + o;
                for (int64_t j = 0; j < N; j++) sa[j] = 0.0f;
                for (int64_t i = 0; i < N; i++) {
                    const float nk = -kk[i];
                    const float *Si = S + i * N;
                    for (int64_t j = 0; j < N; j++) sa[j] += nk * Si[j];
                }
                for (int64_t j = 0; j < N; j++) yt[j] = 0.0f;
                for (int64_t i = 0; i < N; i++) {
                    const float wi = wt[i], bi_ = kk[i] * at[i], ki = kt[i], ri = rt[i];
                    float *Si = S + i * N;
                    for (int64_t j = 0; j < N; j++) {
                        Si[j] = Si[j] * wi + (bi_ * sa[j] + ki * vt[j]);
                        yt[j] += ri * Si[j];
                    }
                }
            }
        }
        /* group norm, the bonus r.k.r_k * v, times g */
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            for (int64_t hd = 0; hd < H; hd++) {
                const int64_t o = m * C + hd * N;
                float *yt = y + o;
                float mean = 0.0f, var = 0.0f, bonus = 0.0f;
                for (int64_t n = 0; n < N; n++) mean += yt[n];
                mean /= (float)N;
                for (int64_t n = 0; n < N; n++) {
                    float d = yt[n] - mean;
                    var += d * d;
                }
                var /= (float)N;
                const float inv = 1.0f / sqrtf(var + 64e-5f);
                for (int64_t n = 0; n < N; n++) bonus += r[o + n] * k[o + n] * L->r_k[hd * N + n];
                for (int64_t n = 0; n < N; n++) {
                    const int64_t c = hd * N + n;
                    float out = (yt[n] - mean) * inv * L->ln_x_w[c] + L->ln_x_b[c];
                    yt[n] = (out + bonus * v[o + n]) * gl[m * C + c];
                }
            }
        }
        {
            Job jobs[1] = {{&L->output, y, x, EPI_ADD}};
            run_jobs(jobs, 1, M, qwork);
        }
        norm_and_shift(x, L->ln2_w, L->ln2_b, ffn_shift, M, T, C, L->ffn_x_k, 1, h2, fx);
        {
            Job jobs[1] = {{&L->ffn_key, fx, ffk, EPI_RELU_SQ}};
            run_jobs(jobs, 1, M, qwork);
        }
        {
            Job jobs[1] = {{&L->ffn_value, ffk, x, EPI_ADD}};
            run_jobs(jobs, 1, M, qwork);
        }
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < B; bi++) {
            memcpy(shift + bi * C, h + (bi * T + T - 1) * C, (size_t)C * sizeof(float));
            memcpy(ffn_shift + bi * C, h2 + (bi * T + T - 1) * C, (size_t)C * sizeof(float));
        }
    }
}

/* ln_out, then the head: logits [M, V] of hidden states x [M, C]; work: rwkv7_workspace(M, C, 0, 0)
 * floats */
void rwkv7_head(const Mat *head, const float *ln_w, const float *ln_b, int64_t M, int64_t C, const float *x,
                float *logits, float *work, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) layer_norm(x + m * C, ln_w, ln_b, C, 1e-5f, work + m * C);
        Job jobs[1] = {{head, work, logits, EPI_SET}};
        run_jobs(jobs, 1, M, (char *)(work + M * C));
    }
}

/* ---------------------------------------------------------------- the sampler's top-k on the CPU */

typedef struct {
    float v;
    int64_t i;
} Ranked;

/* a ranks below b: a smaller value, or the same value at a later index */
static inline int below(Ranked a, Ranked b) { return a.v < b.v || (a.v == b.v && a.i > b.i); }

/* restore the min-heap h[0..n) (the lowest rank at the root) from position at down */
static void sift_down(Ranked *h, int64_t n, int64_t at) {
    for (;;) {
        int64_t low = at;
        const int64_t l = 2 * at + 1, r = l + 1;
        if (l < n && below(h[l], h[low])) low = l;
        if (r < n && below(h[r], h[low])) low = r;
        if (low == at) return;
        const Ranked t = h[at];
        h[at] = h[low];
        h[low] = t;
        at = low;
    }
}

static int by_rank(const void *a, const void *b) {
    const Ranked *x = (const Ranked *)a, *y = (const Ranked *)b;
    return below(*y, *x) ? -1 : below(*x, *y) ? 1 : 0;
}

/* one row: the k largest of x [V] into h (sorted, highest first); 0 where the row holds a NaN */
static int top_row(const float *x, int64_t V, int64_t k, Ranked *h) {
    for (int64_t i = 0; i < k; i++) {
        if (x[i] != x[i]) return 0;
        h[i] = (Ranked){x[i], i};
    }
    for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(h, k, i);
    int64_t i = k;
#if RWKV_AVX2
    /* eight at a time: most values are below the k-th so far, and a compare tells (NaN as well) */
    for (; i + 8 <= V; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 gt = _mm256_cmp_ps(v, _mm256_set1_ps(h[0].v), _CMP_GT_OQ);
        const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        if (_mm256_movemask_ps(nan)) return 0;
        int bits = _mm256_movemask_ps(gt);
        while (bits) {
            const int j = __builtin_ctz(bits);
            bits &= bits - 1;
            if (x[i + j] > h[0].v) { /* the root may have risen since the compare */
                h[0] = (Ranked){x[i + j], i + j};
                sift_down(h, k, 0);
            }
        }
    }
#endif
    for (; i < V; i++) {
        if (x[i] != x[i]) return 0;
        if (x[i] > h[0].v) { /* an equal value at a later index ranks below: kept out */
            h[0] = (Ranked){x[i], i};
            sift_down(h, k, 0);
        }
    }
    qsort(h, (size_t)k, sizeof(Ranked), by_rank);
    return 1;
}

/* torch.topk(x, k, dim=-1) of x [R, V] (1 <= k <= V) into values [R, k] and ids [R, k], highest
 * first, equal values by the lower index first (so k = 1 is torch.argmax); returns 0, with the
 * outputs unspecified, where a row holds a NaN (torch ranks NaN highest: the caller asks it) */
int rwkv7_topk(const float *x, int64_t R, int64_t V, int64_t k, float *values, int64_t *ids, int threads) {
    int ok = 1;
    Ranked *heaps = (Ranked *)malloc((size_t)(R * k) * sizeof(Ranked));
    if (heaps == NULL) return 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(& : ok)
    for (int64_t r = 0; r < R; r++) {
        Ranked *h = heaps + r * k;
        if (!top_row(x + r * V, V, k, h)) {
            ok = 0;
            continue;
        }
        for (int64_t j = 0; j < k; j++) {
            values[r * k + j] = h[j].v;
            ids[r * k + j] = h[j].i;
        }
    }
    free(heaps);
    return ok;
}
