/* Tile-based CPU rasterizer, forward and backward, for clm/render/native_raster.py.
 *
 * It composites exactly what clm/render/torch_rasterizer.py composites (the reference):
 * front to back in depth order (ties by index), alpha = min(0.999, o * exp(-sigma)) skipped
 * when sigma < 0 or alpha < 1/255, and a pixel stops before the Gaussian whose log1p(-alpha),
 * summed in double with the earlier ones, would reach log(1e-4). Each Gaussian only touches the
 * pixels of its bounding box (from its radii, one pixel of margin), like the reference pairs.
 *
 * Gaussians are binned to 16x16 tiles in depth order, so each tile's list is already sorted;
 * tiles are independent and run in parallel. Memory is the tile lists plus per-pixel and
 * per-Gaussian arrays, all allocated by the caller; nothing grows with (pixel, Gaussian) pairs.
 * The backward pass writes one gradient row per tile-list entry that some pixel used, then sums
 * them per Gaussian in a fixed order: results do not depend on the number of threads. Without
 * OpenMP the same source builds a serial kernel. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 16
#define ALPHA_MIN (1.0f / 255.0f)
#define ALPHA_MAX 0.999f
#define LOG_T_MIN (-9.210340371976182) /* log(1e-4) */
#define PREFETCH_DISTANCE 16             /* Gaussians ahead whose box is requested early */
#define GRAD_FIXED 6                     /* d mean x, d mean y, d conic a, b, c, d opacity */

/* order[0..n): Gaussian indices by depth, ties by index (as a stable sort), through an LSD
 * radix sort of the float bits (4 passes of 8 bits), far faster than torch's stable sort.
 * keys and scratch hold 2n uint32 and n int32. -0 sorts with +0; NaN after +inf. */
void clm_raster_order(const float *depths, int64_t n, uint32_t *keys, int32_t *order,
                      int32_t *scratch)
{
    uint32_t *key_a = keys, *key_b = keys + n;
    int32_t *idx_a = order, *idx_b = scratch;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, depths + i, sizeof bits);
        if (bits == 0x80000000u)
            bits = 0;
        else if ((bits & 0x7fffffffu) > 0x7f800000u)
            bits = 0x7fc00000u;
        key_a[i] = bits & 0x80000000u ? ~bits : bits | 0x80000000u;
        idx_a[i] = (int32_t)i;
    }
    for (int shift = 0; shift < 32; shift += 8) {
        int64_t count[257] = {0};
        for (int64_t i = 0; i < n; i++)
            count[((key_a[i] >> shift) & 0xffu) + 1]++;
        for (int b = 0; b < 256; b++)
            count[b + 1] += count[b];
        for (int64_t i = 0; i < n; i++) {
            const int64_t at = count[(key_a[i] >> shift) & 0xffu]++;
            key_b[at] = key_a[i];
            idx_b[at] = idx_a[i];
        }
        uint32_t *kt = key_a;
        key_a = key_b;
        key_b = kt;
        int32_t *it = idx_a;
        idx_a = idx_b;
        idx_b = it;
    }
    /* an even number of passes: the result is back in `order` */
}

/* Pixel box [x0, x1) x [y0, y1) of each Gaussian, as the reference computes it in float. */
static inline int32_t clamp_edge(float v, int32_t hi)
{
    return v >= (float)hi ? hi : (v > 0.0f ? (int32_t)v : 0); /* NaN -> 0: an empty box */
}

void clm_raster_boxes(const float *means2d, const int32_t *radii, int64_t n, int32_t width,
                      int32_t height, int32_t *boxes, int32_t n_threads)
{
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t g = 0; g < n; g++) {
        const float mx = means2d[2 * g], my = means2d[2 * g + 1];
        const float rx = (float)radii[2 * g], ry = (float)radii[2 * g + 1];
        int32_t *b = boxes + 4 * g;
        b[0] = clamp_edge(floorf(mx - rx) - 1.0f, width);
        b[1] = clamp_edge(ceilf(mx + rx) + 1.0f, width);
        b[2] = clamp_edge(floorf(my - ry) - 1.0f, height);
        b[3] = clamp_edge(ceilf(my + ry) + 1.0f, height);
    }
}

/* Tile rectangle [tx0, tx1) x [ty0, ty1) of a pixel box; 0 when the box is empty. */
static inline int tile_rect(const int32_t *b, int32_t *t)
{
    if (b[1] <= b[0] || b[3] <= b[2])
        return 0;
    t[0] = b[0] / TILE;
    t[1] = (b[1] + TILE - 1) / TILE;
    t[2] = b[2] / TILE;
    t[3] = (b[3] + TILE - 1) / TILE;
    return 1;
}

/* counts[k * n_tiles + tile]: entries of depth-order chunk k (of n_chunks) in each tile. */
void clm_raster_count(const int32_t *boxes, const int32_t *order, int64_t n, int32_t tiles_x,
                      int64_t n_tiles, int64_t *counts, int32_t n_chunks)
{
#pragma omp parallel for num_threads(n_chunks) schedule(static, 1)
    for (int32_t k = 0; k < n_chunks; k++) {
        int64_t *cnt = counts + (int64_t)k * n_tiles;
        const int64_t hi = n * (k + 1) / n_chunks;
        for (int64_t i = n * k / n_chunks; i < hi; i++) {
            if (i + PREFETCH_DISTANCE < hi) /* boxes are read in depth order: at random */
                __builtin_prefetch(boxes + 4 * (int64_t)order[i + PREFETCH_DISTANCE]);
            int32_t t[4];
            if (!tile_rect(boxes + 4 * order[i], t))
                continue;
            for (int32_t ty = t[2]; ty < t[3]; ty++)
                for (int32_t tx = t[0]; tx < t[1]; tx++)
                    cnt[(int64_t)ty * tiles_x + tx]++;
        }
    }
}

/* Write each chunk's Gaussians into the tile lists from cursor[k * n_tiles + tile] on, in
 * depth order, so every list ends up sorted by depth and then index. */
void clm_raster_fill(const int32_t *boxes, const int32_t *order, int64_t n, int32_t tiles_x,
                     int64_t n_tiles, int64_t *cursor, int32_t *ids, int32_t n_chunks)
{
#pragma omp parallel for num_threads(n_chunks) schedule(static, 1)
    for (int32_t k = 0; k < n_chunks; k++) {
        int64_t *cur = cursor + (int64_t)k * n_tiles;
        const int64_t hi = n * (k + 1) / n_chunks;
        for (int64_t i = n * k / n_chunks; i < hi; i++) {
            if (i + PREFETCH_DISTANCE < hi)
                __builtin_prefetch(boxes + 4 * (int64_t)order[i + PREFETCH_DISTANCE]);
            const int64_t g = order[i];
            int32_t t[4];
            if (!tile_rect(boxes + 4 * g, t))
                continue;
            for (int32_t ty = t[2]; ty < t[3]; ty++)
                for (int32_t tx = t[0]; tx < t[1]; tx++)
                    ids[cur[(int64_t)ty * tiles_x + tx]++] = (int32_t)g;
        }
    }
}

typedef struct {
    float mx, my, a, b, c, o;
    float sigma_cut; /* above it, o * exp(-sigma) is surely below ALPHA_MIN: skip the exp */
    int32_t x0, x1, y0, y1; /* the box clipped to the tile */
} splat;

/* Gaussian g as seen from the tile at pixels [px0, px1) x [py0, py1); 0 if they miss. */
static inline int load_splat(splat *s, int64_t g, const float *means2d, const float *conics,
                             const float *opac, const int32_t *boxes, int32_t px0, int32_t px1,
                             int32_t py0, int32_t py1)
{
    const int32_t *b = boxes + 4 * g;
    s->x0 = b[0] > px0 ? b[0] : px0;
    s->x1 = b[1] < px1 ? b[1] : px1;
    s->y0 = b[2] > py0 ? b[2] : py0;
    s->y1 = b[3] < py1 ? b[3] : py1;
    if (s->x1 <= s->x0 || s->y1 <= s->y0)
        return 0;
    s->mx = means2d[2 * g];
    s->my = means2d[2 * g + 1];
    s->a = conics[3 * g];
    s->b = conics[3 * g + 1];
    s->c = conics[3 * g + 2];
    s->o = opac[g];
    /* exp(-sigma) rounds with relative error ~1e-7: a 1e-3 margin keeps every pair that can
     * reach the threshold. NaN (o <= 0 or NaN) compares false and skips nothing. */
    s->sigma_cut = logf(s->o / ALPHA_MIN) + 1e-3f;
    return 1;
}

/* The reference's alpha at pixel (x, y), with the same float operations; 0 if it is skipped.
 * Also gives o * exp(-sigma) before the clamp, exp(-sigma) and the offsets. */
static inline int pair_alpha(const splat *s, int32_t x, int32_t y, float *alpha, float *raw,
                             float *decay, float *dx, float *dy)
{
    const float ex = s->mx - ((float)x + 0.5f), ey = s->my - ((float)y + 0.5f);
    const float sigma = 0.5f * (s->a * ex * ex + s->c * ey * ey) + s->b * ex * ey;
    if (!(sigma >= 0.0f) || sigma > s->sigma_cut)
        return 0;
    const float e = expf(-sigma);
    const float r = s->o * e;
    const float al = r > ALPHA_MAX ? ALPHA_MAX : r;
    if (!(al >= ALPHA_MIN))
        return 0;
    *alpha = al;
    *raw = r;
    *decay = e;
    *dx = ex;
    *dy = ey;
    return 1;
}

/* image [H, W, C] (background added when bg is not NULL), alpha_out [H, W], per pixel its final
 * transmittance and `last`, one past the tile entry that contributed to it last, and per tile
 * `used`, the largest `last` of its pixels: the entries the backward pass visits. The stop is
 * decided on the reference's sum of log1p(-alpha); the weights use the running product, which
 * agrees with the reference's exp of that sum to float rounding and saves an exp per pair. */
void clm_raster_forward(const float *means2d, const float *conics, const float *colors,
                        const float *opac, const int32_t *boxes, const int32_t *ids,
                        const int64_t *tile_offsets, int32_t channels, int32_t width,
                        int32_t height, const float *bg, float *image, float *alpha_out,
                        double *trans, int32_t *last, int64_t *used, int32_t n_threads)
{
    const int32_t tiles_x = (width + TILE - 1) / TILE, tiles_y = (height + TILE - 1) / TILE;
    const int64_t C = channels;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int64_t tile = 0; tile < (int64_t)tiles_x * tiles_y; tile++) {
        const int32_t px0 = (int32_t)(tile % tiles_x) * TILE;
        const int32_t py0 = (int32_t)(tile / tiles_x) * TILE;
        const int32_t px1 = px0 + TILE < width ? px0 + TILE : width;
        const int32_t py1 = py0 + TILE < height ? py0 + TILE : height;
        const int64_t start = tile_offsets[tile], end = tile_offsets[tile + 1];
        double log_t[TILE * TILE];
        unsigned char done[TILE * TILE];
        int64_t open = 0;
        for (int32_t y = py0; y < py1; y++)
            for (int32_t x = px0; x < px1; x++) {
                const int64_t p = (int64_t)y * width + x;
                log_t[(y - py0) * TILE + (x - px0)] = 0.0;
                done[(y - py0) * TILE + (x - px0)] = 0;
                trans[p] = 1.0;
                last[p] = 0;
                memset(image + p * C, 0, (size_t)C * sizeof(float));
                open++;
            }
        for (int64_t e = start; e < end && open > 0; e++) {
            const int64_t g = ids[e];
            splat s;
            if (!load_splat(&s, g, means2d, conics, opac, boxes, px0, px1, py0, py1))
                continue;
            const float *col = colors + g * C;
            for (int32_t y = s.y0; y < s.y1; y++)
                for (int32_t x = s.x0; x < s.x1; x++) {
                    const int64_t p = (int64_t)y * width + x;
                    const int32_t l = (y - py0) * TILE + (x - px0);
                    float al, raw, decay, dx, dy;
                    if (done[l] || !pair_alpha(&s, x, y, &al, &raw, &decay, &dx, &dy))
                        continue;
                    const double next = log_t[l] + (double)log1pf(-al);
                    if (!(next > LOG_T_MIN)) {
                        done[l] = 1;
                        open--;
                        continue;
                    }
                    const float w = al * (float)trans[p];
                    float *out = image + p * C;
                    for (int64_t k = 0; k < C; k++)
                        out[k] += w * col[k];
                    log_t[l] = next;
                    trans[p] *= 1.0 - (double)al;
                    last[p] = (int32_t)(e - start + 1);
                }
        }
        used[tile] = 0;
        for (int32_t y = py0; y < py1; y++)
            for (int32_t x = px0; x < px1; x++) {
                const int64_t p = (int64_t)y * width + x;
                if (last[p] > used[tile])
                    used[tile] = last[p];
                const float t = (float)trans[p];
                alpha_out[p] = 1.0f - t;
                if (bg)
                    for (int64_t k = 0; k < C; k++)
                        image[p * C + k] += t * bg[k];
            }
    }
}

/* Which Gaussians the forward pass reads, as kernels/reach.cu finds them for gsplat (the same
 * margins): marks[g] = 1 for each Gaussian a pixel composites or stops at, marked down to alpha
 * REACH_ALPHA while the transmittance follows the forward's rule, until it falls to REACH_LOG_T,
 * and then the Gaussians of the depth it fell at. */
#define REACH_ALPHA (0.9999f / 255.0f)
#define REACH_LOG_T (-9.220390707829685) /* log(0.99e-4) */
void clm_raster_reach(const float *means2d, const float *conics, const float *opac,
                      const float *depths, const int32_t *boxes, const int32_t *ids,
                      const int64_t *tile_offsets, int32_t width, int32_t height,
                      unsigned char *marks, int32_t n_threads)
{
    const int32_t tiles_x = (width + TILE - 1) / TILE, tiles_y = (height + TILE - 1) / TILE;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int64_t tile = 0; tile < (int64_t)tiles_x * tiles_y; tile++) {
        const int32_t px0 = (int32_t)(tile % tiles_x) * TILE;
        const int32_t py0 = (int32_t)(tile / tiles_x) * TILE;
        const int32_t px1 = px0 + TILE < width ? px0 + TILE : width;
        const int32_t py1 = py0 + TILE < height ? py0 + TILE : height;
        double log_t[TILE * TILE];
        float stop_depth[TILE * TILE];
        unsigned char state[TILE * TILE]; /* 0 open, 1 closing (ties left), 2 done */
        int64_t open = (int64_t)(px1 - px0) * (py1 - py0);
        for (int32_t l = 0; l < TILE * TILE; l++) {
            log_t[l] = 0.0;
            state[l] = 0;
        }
        for (int64_t e = tile_offsets[tile]; e < tile_offsets[tile + 1] && open > 0; e++) {
            const int64_t g = ids[e];
            splat s;
            if (!load_splat(&s, g, means2d, conics, opac, boxes, px0, px1, py0, py1))
                continue;
            for (int32_t y = s.y0; y < s.y1; y++)
                for (int32_t x = s.x0; x < s.x1; x++) {
                    const int32_t l = (y - py0) * TILE + (x - px0);
                    if (state[l] == 2)
                        continue;
                    if (state[l] == 1 && depths[g] != stop_depth[l]) {
                        state[l] = 2;
                        open--;
                        continue;
                    }
                    const float ex = s.mx - ((float)x + 0.5f), ey = s.my - ((float)y + 0.5f);
                    const float sigma = 0.5f * (s.a * ex * ex + s.c * ey * ey) + s.b * ex * ey;
                    if (!(sigma >= 0.0f) || sigma > s.sigma_cut)
                        continue;
                    const float r = s.o * expf(-sigma);
                    const float al = r > ALPHA_MAX ? ALPHA_MAX : r;
                    if (!(al >= REACH_ALPHA))
                        continue;
#pragma omp atomic write
                    marks[g] = 1;
                    if (state[l] == 1 || !(al >= ALPHA_MIN))
                        continue;
                    log_t[l] += (double)log1pf(-al);
                    if (!(log_t[l] > REACH_LOG_T)) {
                        state[l] = 1;
                        stop_depth[l] = depths[g];
                    }
                }
        }
    }
}

/* Gradient rows (mean x, mean y, conic a, b, c, opacity, colour 0..C-1) of the entries the
 * pixels used, back to front per pixel from the forward's trans and last: the first used[t]
 * entries of tile t have rows used_offsets[t] onwards. */
void clm_raster_backward(const float *means2d, const float *conics, const float *colors,
                         const float *opac, const int32_t *boxes, const int32_t *ids,
                         const int64_t *tile_offsets, int32_t channels, int32_t width,
                         int32_t height, const float *bg, const double *trans,
                         const int32_t *last, const int64_t *used_offsets,
                         const float *grad_image, const float *grad_alpha, float *entry_grads,
                         int32_t n_threads)
{
    const int32_t tiles_x = (width + TILE - 1) / TILE, tiles_y = (height + TILE - 1) / TILE;
    const int64_t C = channels, stride = GRAD_FIXED + C;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int64_t tile = 0; tile < (int64_t)tiles_x * tiles_y; tile++) {
        const int32_t px0 = (int32_t)(tile % tiles_x) * TILE;
        const int32_t py0 = (int32_t)(tile / tiles_x) * TILE;
        const int32_t px1 = px0 + TILE < width ? px0 + TILE : width;
        const int32_t py1 = py0 + TILE < height ? py0 + TILE : height;
        const int64_t start = tile_offsets[tile], row0 = used_offsets[tile];
        const int64_t n_used = used_offsets[tile + 1] - row0;
        double acc[TILE * TILE]; /* transmittance after the current entry */
        float rest[TILE * TILE]; /* behind the entry: sum w_j c_j.G + T_final (bg.G - G_alpha) */
        for (int32_t y = py0; y < py1; y++)
            for (int32_t x = px0; x < px1; x++) {
                const int64_t p = (int64_t)y * width + x;
                const int32_t l = (y - py0) * TILE + (x - px0);
                const float t = (float)trans[p];
                float dot = 0.0f;
                if (bg)
                    for (int64_t k = 0; k < C; k++)
                        dot += bg[k] * grad_image[p * C + k];
                acc[l] = trans[p];
                rest[l] = t * (dot - grad_alpha[p]);
            }
        memset(entry_grads + row0 * stride, 0, (size_t)(n_used * stride) * sizeof(float));
        for (int64_t e = start + n_used - 1; e >= start; e--) {
            const int64_t g = ids[e];
            splat s;
            if (!load_splat(&s, g, means2d, conics, opac, boxes, px0, px1, py0, py1))
                continue;
            const float *col = colors + g * C;
            float *out = entry_grads + (row0 + e - start) * stride;
            for (int32_t y = s.y0; y < s.y1; y++)
                for (int32_t x = s.x0; x < s.x1; x++) {
                    const int64_t p = (int64_t)y * width + x;
                    const int32_t l = (y - py0) * TILE + (x - px0);
                    float al, raw, decay, dx, dy;
                    if (e - start >= last[p] || !pair_alpha(&s, x, y, &al, &raw, &decay, &dx, &dy))
                        continue;
                    const float *gi = grad_image + p * C;
                    float cg = 0.0f;
                    for (int64_t k = 0; k < C; k++)
                        cg += col[k] * gi[k];
                    acc[l] /= 1.0 - (double)al;
                    const float t = (float)acc[l];
                    const float w = al * t;
                    for (int64_t k = 0; k < C; k++)
                        out[GRAD_FIXED + k] += w * gi[k];
                    const float d_alpha = t * cg - rest[l] / (1.0f - al);
                    rest[l] += w * cg;
                    if (raw > ALPHA_MAX) /* clamped: no gradient to o or sigma */
                        continue;
                    const float d_sigma = -d_alpha * raw;
                    out[0] += d_sigma * (s.a * dx + s.b * dy);
                    out[1] += d_sigma * (s.c * dy + s.b * dx);
                    out[2] += d_sigma * 0.5f * dx * dx;
                    out[3] += d_sigma * dx * dy;
                    out[4] += d_sigma * 0.5f * dy * dy;
                    out[5] += d_alpha * decay;
                }
        }
    }
}

/* grads[g] += the backward rows of Gaussian g, in tile order; each thread owns a range of g. */
void clm_raster_reduce(const int32_t *ids, const int64_t *tile_offsets,
                       const int64_t *used_offsets, int64_t n_tiles, const float *entry_grads,
                       int64_t stride, float *grads, int64_t n, int32_t n_threads)
{
#pragma omp parallel num_threads(n_threads)
    {
#ifdef _OPENMP
        const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
#else
        const int64_t part = 0, parts = 1;
#endif
        const int64_t lo = n * part / parts, hi = n * (part + 1) / parts;
        for (int64_t tile = 0; tile < n_tiles; tile++) {
            const int64_t start = tile_offsets[tile], row0 = used_offsets[tile];
            for (int64_t row = row0; row < used_offsets[tile + 1]; row++) {
                const int64_t g = ids[start + row - row0];
                if (g < lo || g >= hi)
                    continue;
                const float *src = entry_grads + row * stride;
                float *dst = grads + g * stride;
                for (int64_t k = 0; k < stride; k++)
                    dst[k] += src[k];
            }
        }
    }
}
