/* Lazy sparse Adam over the chunked host row store, parallel over rows with OpenMP.
 *
 * The math is documented in clm/optim/lazy_adam.py; this is the same update with the same
 * arithmetic. The normal step mirrors torch's float32 CPU kernels operation by operation:
 *   m.lerp_(g, 1 - b1)                 -> fma(w, g - m, m)   (w - 1, g - m, g when w >= 0.5)
 *   v.mul_(b2).addcmul_(g, g, 1 - b2)  -> fma((1 - b2) * g, g, v * b2)
 *   (v.sqrt() / sqrt(bc2)).add_(eps)   -> sqrtf(v) / bc2_sqrt + eps
 *   p.addcdiv_(m, denom, -lr / bc1)    -> p + (neg_step * m) / denom
 * torch's CPU builds fuse the first two multiply-adds where the hardware has FMA (lerp through
 * Vectorized::fmadd, addcmul through compiler contraction), so we do too; build with
 * -ffp-contract=off so nothing else gets fused.
 * The catch-up of skipped zero-gradient steps is done in double.
 *
 * Row r lives in chunk r >> chunk_shift at offset r & (2^chunk_shift - 1); each chunk holds
 * 2^chunk_shift rows of row_stride floats (and one int32 `last` per row). Only the first
 * `width` columns of a row are read or written. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef FP_FAST_FMAF
#define MADD(a, b, c) fmaf((a), (b), (c))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* Rows ahead of the current one whose cache lines are requested early (random row order). */
#define PREFETCH_DISTANCE 8

/* Rows a thread takes at a time. The loops are scheduled dynamically: while training, the
 * threads share the cores with the main thread (which spins on CUDA syncs) and the image
 * loader, so a static split waits for whichever thread was descheduled. At 40M Gaussians on
 * 16 cores, stepping a batch's 5M rows took 190 ms with a static split, 145 ms this way. */
#define ROWS_PER_GRAB 2048

typedef struct {
    float *const *param;      /* chunk pointers, each [2^chunk_shift, row_stride] */
    float *const *exp_avg;
    float *const *exp_avg_sq;
    int32_t *const *last;     /* chunk pointers, each [2^chunk_shift] */
    int64_t chunk_shift;
    int64_t row_stride;
} clm_store;

typedef struct {
    int64_t start, end;       /* columns [start, end) */
    float neg_step_size;      /* float(-(lr_t / bc1_t)): torch's addcdiv value */
    const double *skip;       /* skip[t0]: closed-form sum over the skipped steps */
} clm_segment;

typedef struct {
    float lerp_weight;        /* float(1 - b1) */
    float beta2;              /* float(b2) */
    float one_minus_beta2;    /* float(1 - b2) */
    float bc2_sqrt;           /* float(sqrt(1 - b2^t)) */
    float eps;
} clm_step;

typedef struct {
    float *p, *m, *v;
    int32_t *last;
} row_ref;

static inline row_ref locate(const clm_store *s, int64_t r)
{
    const int64_t chunk = r >> s->chunk_shift;
    const int64_t off = r & (((int64_t)1 << s->chunk_shift) - 1);
    const int64_t at = off * s->row_stride;
    row_ref ref = {s->param[chunk] + at, s->exp_avg[chunk] + at, s->exp_avg_sq[chunk] + at,
                   s->last[chunk] + off};
    return ref;
}

static inline void prefetch_row(const clm_store *s, int64_t r, int64_t width)
{
    const row_ref ref = locate(s, r);
    for (int64_t c = 0; c < width; c += 64 / sizeof(float)) {
        __builtin_prefetch(ref.p + c, 1);
        __builtin_prefetch(ref.m + c, 1);
        __builtin_prefetch(ref.v + c, 1);
    }
    __builtin_prefetch(ref.last, 1);
}

/* Apply the zero-gradient steps last+1 .. upto in closed form (no-op when none are pending). */
static inline void catch_up_row(float *restrict p, float *restrict m, float *restrict v,
                                int64_t width, int32_t t0, int32_t upto,
                                const clm_segment *segs, int32_t n_segs,
                                const double *decay1, const double *decay2)
{
    if (t0 >= upto)
        return;
    const double d1 = decay1[upto - t0], d2 = decay2[upto - t0];
    for (int32_t i = 0; i < n_segs; i++) {
        const int64_t end = segs[i].end < width ? segs[i].end : width;
        const double sum = segs[i].skip[t0];
        for (int64_t c = segs[i].start; c < end; c++) {
            const double mc = m[c], vc = v[c];
            const double update = vc > 0.0 ? mc / sqrt(vc) * sum : 0.0;
            p[c] = (float)((double)p[c] - update);
            m[c] = (float)(mc * d1);
            v[c] = (float)(vc * d2);
        }
    }
}

static inline void adam_row(float *restrict p, float *restrict m, float *restrict v,
                            const float *restrict g, int64_t width, const clm_step *st,
                            const clm_segment *segs, int32_t n_segs)
{
    /* torch's lerp: start + w * (end - start) for |w| < 0.5, else end + (w - 1) * (end - start) */
    const int small = st->lerp_weight < 0.5f;
    const float coeff = small ? st->lerp_weight : st->lerp_weight - 1.0f;
    const float b2 = st->beta2, omb2 = st->one_minus_beta2, bc2s = st->bc2_sqrt, eps = st->eps;
    for (int32_t i = 0; i < n_segs; i++) {
        const int64_t end = segs[i].end < width ? segs[i].end : width;
        const float neg_step = segs[i].neg_step_size;
        for (int64_t c = segs[i].start; c < end; c++) {
            const float gc = g[c], m0 = m[c];
            const float mc = MADD(coeff, gc - m0, small ? m0 : gc);
            const float vc = MADD(omb2 * gc, gc, v[c] * b2);
            const float denom = sqrtf(vc) / bc2s + eps;
            p[c] = p[c] + (neg_step * mc) / denom;
            m[c] = mc;
            v[c] = vc;
        }
    }
}

static inline int all_zero(const float *g, int64_t width)
{
    for (int64_t c = 0; c < width; c++)
        if (g[c] != 0.0f)
            return 0;
    return 1;
}

/* Adam step `step` for rows[0..n) (unique) with gradients grads[i * grad_stride + c]:
 * catch up the steps skipped since each row's `last`, apply the step, set last = step.
 * With skip_zero, a row whose gradient is zero in every column is not touched: its step is a
 * skipped step, applied in closed form at its next catch-up, so only its gradient row is read.
 * decay1[k] = b1^k, decay2[k] = b2^k; segment skip tables cover steps up to step - 1.
 * Returns the number of rows stepped. */
int64_t clm_adam_step_rows(const clm_store *store, int64_t width, const int64_t *rows, int64_t n,
                           const float *grads, int64_t grad_stride, int32_t step,
                           const clm_step *st, const clm_segment *segs, int32_t n_segs,
                           const double *decay1, const double *decay2, int32_t skip_zero,
                           int32_t n_threads)
{
    int64_t stepped = 0;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, ROWS_PER_GRAB) reduction(+ : stepped)
    for (int64_t i = 0; i < n; i++) {
        const int64_t ahead = i + PREFETCH_DISTANCE;
        if (ahead < n && !(skip_zero && all_zero(grads + ahead * grad_stride, width)))
            prefetch_row(store, rows[ahead], width);
        if (skip_zero && all_zero(grads + i * grad_stride, width))
            continue;
        stepped++;
        const row_ref ref = locate(store, rows[i]);
        catch_up_row(ref.p, ref.m, ref.v, width, *ref.last, step - 1, segs, n_segs, decay1,
                     decay2);
        adam_row(ref.p, ref.m, ref.v, grads + i * grad_stride, width, st, segs, n_segs);
        *ref.last = step;
    }
    return stepped;
}

/* Apply every pending zero-gradient step up to and including `upto` to rows[0..n), or to rows
 * 0..n-1 when rows is NULL, and set last = upto. Segment skip tables cover steps up to upto.
 * Returns how many rows had steps pending (those whose values were read and written). */
int64_t clm_adam_catch_up(const clm_store *store, int64_t width, const int64_t *rows, int64_t n,
                          int32_t upto, const clm_segment *segs, int32_t n_segs,
                          const double *decay1, const double *decay2, int32_t n_threads)
{
    int64_t pending = 0;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, ROWS_PER_GRAB) reduction(+ : pending)
    for (int64_t i = 0; i < n; i++) {
        /* Rows are often already up to date (caught up ahead): look at `last` two distances
         * ahead, and fetch a row's values only when it has steps pending. */
        if (rows && i + 2 * PREFETCH_DISTANCE < n)
            __builtin_prefetch(locate(store, rows[i + 2 * PREFETCH_DISTANCE]).last, 0);
        if (rows && i + PREFETCH_DISTANCE < n) {
            const int64_t ahead = rows[i + PREFETCH_DISTANCE];
            if (*locate(store, ahead).last < upto)
                prefetch_row(store, ahead, width);
        }
        const row_ref ref = locate(store, rows ? rows[i] : i);
        pending += *ref.last < upto;
        catch_up_row(ref.p, ref.m, ref.v, width, *ref.last, upto, segs, n_segs, decay1, decay2);
        *ref.last = upto;
    }
    return pending;
}
