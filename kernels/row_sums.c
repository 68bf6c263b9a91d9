/* Per-row sums of gradient rows that arrive in parts (rows used in several stretches of a
 * batch), parallel over rows with OpenMP.
 *
 * A row gets a slot the first time one of its parts arrives; slots are handed out in arrival
 * order, so the result does not depend on the thread count. slot_of[r] is the slot of row r,
 * or -1; row_of_slot[s] the row in slot s. Slot s lives in block s >> block_shift at row
 * s & (2^block_shift - 1) of block_stride floats. The first part of a row is copied into its
 * slot and later parts are added, one after another in arrival order, in float32. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_THREADS 256
/* Rows ahead of the current one whose index entry, or sum, is requested early (random rows). */
#define PREFETCH_DISTANCE 16

/* Add grads[i * grad_stride + 0..width) to the sum of rows[i] for i < n; the rows of one call
 * must be distinct (each has one writer). `count` slots are in use before the call; the blocks
 * must hold count + n slots. Returns the slots in use after it, or -1 when out of memory. */
int64_t clm_row_sums_add(int32_t *slot_of, const int64_t *rows, int64_t n, const float *grads,
                         int64_t grad_stride, int64_t width, float *const *blocks,
                         int64_t block_shift, int64_t block_stride, int64_t *row_of_slot,
                         int64_t count, int32_t n_threads)
{
    if (n_threads > MAX_THREADS)
        n_threads = MAX_THREADS;
    if (n_threads < 1)
        n_threads = 1;
    int64_t first_new[MAX_THREADS + 1];
    const int64_t mask = ((int64_t)1 << block_shift) - 1;
    int64_t *slot = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t)); /* each row's, or -1 */
    if (slot == NULL)
        return -1;
#pragma omp parallel num_threads(n_threads)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), threads = omp_get_num_threads();
#else
        const int t = 0, threads = 1;
#endif
        const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
        int64_t fresh = 0;
        for (int64_t i = lo; i < hi; i++) {
            if (i + PREFETCH_DISTANCE < hi)
                __builtin_prefetch(slot_of + rows[i + PREFETCH_DISTANCE], 0);
            slot[i] = slot_of[rows[i]];
            fresh += slot[i] < 0;
        }
        first_new[t + 1] = fresh;
#pragma omp barrier
#pragma omp single
        {
            first_new[0] = count;
            for (int k = 1; k <= threads; k++)
                first_new[k] += first_new[k - 1];
        }
        int64_t next = first_new[t];
        for (int64_t i = lo; i < hi; i++) {
            if (i + PREFETCH_DISTANCE < hi && slot[i + PREFETCH_DISTANCE] >= 0) {
                const int64_t ahead = slot[i + PREFETCH_DISTANCE];
                __builtin_prefetch(blocks[ahead >> block_shift] + (ahead & mask) * block_stride, 1);
            }
            const int64_t r = rows[i];
            const float *src = grads + i * grad_stride;
            int64_t s = slot[i];
            if (s < 0) {
                s = next++;
                slot_of[r] = (int32_t)s;
                row_of_slot[s] = r;
                memcpy(blocks[s >> block_shift] + (s & mask) * block_stride, src,
                       (size_t)width * sizeof(float));
                continue;
            }
            float *dst = blocks[s >> block_shift] + (s & mask) * block_stride;
            for (int64_t c = 0; c < width; c++)
                dst[c] += src[c];
        }
#pragma omp barrier
#pragma omp single
        count = first_new[threads];
    }
    free(slot);
    return count;
}

/* Forget the first `count` slots: slot_of[row_of_slot[s]] = -1. */
void clm_row_sums_clear(int32_t *slot_of, const int64_t *row_of_slot, int64_t count,
                        int32_t n_threads)
{
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t s = 0; s < count; s++)
        slot_of[row_of_slot[s]] = -1;
}
