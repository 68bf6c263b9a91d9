// Which Gaussians a 3DGS render reads: a colour-free walk of gsplat 1.5.3's forward rasterizer
// (RasterizeToPixels3DGSFwd), over the same projection and tile lists.
//
// Each pixel reads, front to back, the Gaussians of its tile: one with alpha under 1/255 is
// skipped, and the pixel stops before the one that would take its transmittance to 1e-4 or
// below. It composites the Gaussians in between, forward and backward; the one it stops at
// decides where it stops. Those are marked here: a render from the marked Gaussians alone
// gives every pixel the same ones in the same order, so the same image and gradients, and the
// offload engine need not fetch (or render) the rows of the others.
//
// The walk marks a superset of them:
// - down to alpha 0.9999/255 (an alpha a compiler rounds differently), while the
//   transmittance follows the render's own rule;
// - until the transmittance falls to 0.99e-4 instead of 1e-4, the Gaussian it falls at too;
// - after that, the Gaussians of that one's depth: the render's stable sort may order such
//   ties otherwise, when its rows come in another order.

#define REACH_TILE 16
#define ALPHA_THRESHOLD (1.0f / 255.0f)
#define MARK_THRESHOLD (0.9999f / 255.0f)
#define STOP_T 0.99e-4f

extern "C" __global__ void mark_reached(
    const float* __restrict__ means2d,     // [M, 2] packed projection
    const float* __restrict__ conics,      // [M, 3]
    const float* __restrict__ opacities,   // [M]
    const float* __restrict__ depths,      // [M]
    const int* __restrict__ tile_offsets,  // [tile_height * tile_width]
    const int* __restrict__ flatten_ids,   // [n_isects], indices into the packed arrays
    const int n_isects,
    const int width,
    const int height,
    const int tile_width,
    const int tile_count,
    unsigned char* __restrict__ reached)   // [M], set to 1 where reached
{
    __shared__ int ids[REACH_TILE * REACH_TILE];
    __shared__ float3 xy_opacity[REACH_TILE * REACH_TILE];
    __shared__ float3 conic_of[REACH_TILE * REACH_TILE];
    __shared__ float depth_of[REACH_TILE * REACH_TILE];

    const int tile = blockIdx.x;
    const int i = (tile / tile_width) * REACH_TILE + threadIdx.y;
    const int j = (tile % tile_width) * REACH_TILE + threadIdx.x;
    const int rank = threadIdx.y * REACH_TILE + threadIdx.x;
    const int block_size = REACH_TILE * REACH_TILE;
    const float px = (float)j + 0.5f;
    const float py = (float)i + 0.5f;
    bool done = !(i < height && j < width);

    const int start = tile_offsets[tile];
    const int end = tile == tile_count - 1 ? n_isects : tile_offsets[tile + 1];
    float T = 1.0f;
    bool closing = false;  // stopped: only ties of the stopping depth are left to mark
    float stop_depth = 0.0f;

    for (int batch = start; batch < end; batch += block_size) {
        // (also the barrier before this batch overwrites the last one's shared memory)
        if (__syncthreads_count(done) >= block_size) break;
        const int idx = batch + rank;
        if (idx < end) {
            const int g = flatten_ids[idx];
            ids[rank] = g;
            xy_opacity[rank] = make_float3(means2d[2 * g], means2d[2 * g + 1], opacities[g]);
            conic_of[rank] = make_float3(conics[3 * g], conics[3 * g + 1], conics[3 * g + 2]);
            depth_of[rank] = depths[g];
        }
        __syncthreads();
        const int count = min(block_size, end - batch);
        for (int t = 0; t < count && !done; ++t) {
            if (closing && depth_of[t] != stop_depth) {
                done = true;
                break;
            }
            const float3 conic = conic_of[t];
            const float3 xyo = xy_opacity[t];
            const float dx = xyo.x - px;
            const float dy = xyo.y - py;
            const float sigma =
                0.5f * (conic.x * dx * dx + conic.z * dy * dy) + conic.y * dx * dy;
            const float alpha = fminf(0.999f, xyo.z * __expf(-sigma));
            if (sigma < 0.f || alpha < MARK_THRESHOLD) continue;
            reached[ids[t]] = 1;
            if (closing || alpha < ALPHA_THRESHOLD) continue;
            T = T * (1.0f - alpha);
            if (T <= STOP_T) {
                closing = true;
                stop_depth = depth_of[t];
            }
        }
    }
}
