// Conservative frustum culling of every Gaussian against up to 64 cameras at once.
// Bit c of out_bits[i] is set when Gaussian i may touch camera c's image, by one of the two
// bounds derived in clm/offload/culling.py, so no Gaussian gsplat would draw is culled:
//   BOUND_ELLIPSOID (3D Gaussians): gsplat's 3.33-sigma radius of the clamped EWA projection,
//     bounded with the largest scale;
//   BOUND_SURFEL (2DGS splats): the perspective image of the ball of the largest scale around
//     the centre, scaled 3.33 times about its own centre and padded for gsplat's rounding; kept
//     outright when closer than SURFEL_NEAR_SCALES of that scale.
// cull_bits_torch in culling.py is the same arithmetic in torch.

#define CAM_STRIDE 24
#define BOUND_ELLIPSOID 0
#define BOUND_SURFEL 1
#define SURFEL_MAX_Q 0.5f  // 1 / SURFEL_NEAR_SCALES

// Whether a 3D Gaussian of largest scale squared s2, at camera point (x, y, 1/rz), may touch
// camera k's image (the clamped-EWA box, see culling.py).
__device__ __forceinline__ bool ellipsoid_touches(
    const float* k, const float x, const float y, const float rz, const float s2)
{
    const float px = k[12] * x * rz + k[14];
    const float py = k[13] * y * rz + k[15];
    const float fxz = k[12] * rz, fyz = k[13] * rz;
    const float rx = k[22] * sqrtf(fxz * fxz * k[18] * s2 + 0.3f) + 1.5f;
    const float ry = k[22] * sqrtf(fyz * fyz * k[19] * s2 + 0.3f) + 1.5f;
    return px + rx > 0.0f && px - rx < k[16] && py + ry > 0.0f && py - ry < k[17];
}

// Whether a flat splat of largest scale s, at camera point (x, y, 1/rz), may touch camera k's
// image (the perspective image of its ball, see culling.py). __fmul_rn: no fused
// multiply-adds, each step rounds as the torch twin's does.
__device__ __forceinline__ bool surfel_touches(
    const float* k, const float x, const float y, const float rz, const float s)
{
    const float q = s * rz;  // largest scale over depth
    if (!(q <= SURFEL_MAX_Q)) return true;  // close (or NaN): kept
    const float w = 1.0f - __fmul_rn(q, q);
    const float xn = x * rz, yn = y * rz;
    const float px = __fmul_rn(k[12], xn) / w + k[14];
    const float py = __fmul_rn(k[13], yn) / w + k[15];
    const float hx = __fmul_rn(k[12], q) * sqrtf(__fmul_rn(xn, xn) + w) / w;
    const float hy = __fmul_rn(k[13], q) * sqrtf(__fmul_rn(yn, yn) + w) / w;
    const float rx = __fmul_rn(k[22], hx) + k[23];
    const float ry = __fmul_rn(k[22], hy) + k[23];
    return px + rx > 0.0f && px - rx < k[16] && py + ry > 0.0f && py - ry < k[17];
}

extern "C" __global__ void cull_bits(
    const float* __restrict__ means,          // [n, 3], rows means_stride floats apart
    const long long means_stride,
    const float* __restrict__ log_scales,     // [n, >= num_scales], rows scales_stride apart
    const long long scales_stride,
    const int num_scales,                     // leading columns read: 1-3 (ellipsoid), 2 (surfel)
    const float* __restrict__ opacity_logits, // [n], opacity_stride floats apart
    const long long opacity_stride,
    const long long n,
    const float* __restrict__ cams,           // [num_cams, CAM_STRIDE]
    const int num_cams,
    const float min_opacity_logit,
    const int bound,                          // BOUND_ELLIPSOID or BOUND_SURFEL
    long long* __restrict__ out_bits)         // [n]
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long bits = 0ull;
    if (opacity_logits[i * opacity_stride] >= min_opacity_logit) {
        const float* m = means + i * means_stride;
        const float* l = log_scales + i * scales_stride;
        const float mx = m[0], my = m[1], mz = m[2];
        float l_max = l[0];
        for (int j = 1; j < num_scales; ++j) l_max = fmaxf(l_max, l[j]);
        const bool ellipsoid = bound == BOUND_ELLIPSOID;
        const float s = ellipsoid ? __expf(l_max) : expf(l_max);
        for (int c = 0; c < num_cams; ++c) {
            const float* k = cams + c * CAM_STRIDE;
            const float z = k[6] * mx + k[7] * my + k[8] * mz + k[11];
            if (!(z >= k[20] && z <= k[21])) continue;
            const float x = k[0] * mx + k[1] * my + k[2] * mz + k[9];
            const float y = k[3] * mx + k[4] * my + k[5] * mz + k[10];
            const float rz = 1.0f / z;
            if (ellipsoid ? ellipsoid_touches(k, x, y, rz, s * s) : surfel_touches(k, x, y, rz, s)) {
                bits |= 1ull << c;
            }
        }
    }
    out_bits[i] = (long long)bits;
}
