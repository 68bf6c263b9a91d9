// Conservative frustum culling of every Gaussian against up to 64 cameras at once.
// Bit c of out_bits[i] is set when Gaussian i may touch camera c's image: the bound is the
// one derived in clm/offload/culling.py (gsplat's 3.33-sigma radius of the clamped EWA
// projection, bounded with the largest scale), so no Gaussian gsplat would draw is culled.

#define CAM_STRIDE 24

extern "C" __global__ void cull_bits(
    const float* __restrict__ means,          // [n, 3], rows means_stride floats apart
    const long long means_stride,
    const float* __restrict__ log_scales,     // [n, 3], rows scales_stride floats apart
    const long long scales_stride,
    const float* __restrict__ opacity_logits, // [n], opacity_stride floats apart
    const long long opacity_stride,
    const long long n,
    const float* __restrict__ cams,           // [num_cams, CAM_STRIDE]
    const int num_cams,
    const float min_opacity_logit,
    long long* __restrict__ out_bits)         // [n]
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long bits = 0ull;
    if (opacity_logits[i * opacity_stride] >= min_opacity_logit) {
        const float* m = means + i * means_stride;
        const float* l = log_scales + i * scales_stride;
        const float mx = m[0], my = m[1], mz = m[2];
        const float s = __expf(fmaxf(l[0], fmaxf(l[1], l[2])));
        const float s2 = s * s;
        for (int c = 0; c < num_cams; ++c) {
            const float* k = cams + c * CAM_STRIDE;
            const float z = k[6] * mx + k[7] * my + k[8] * mz + k[11];
            if (!(z >= k[20] && z <= k[21])) continue;
            const float x = k[0] * mx + k[1] * my + k[2] * mz + k[9];
            const float y = k[3] * mx + k[4] * my + k[5] * mz + k[10];
            const float rz = 1.0f / z;
            const float px = k[12] * x * rz + k[14];
            const float py = k[13] * y * rz + k[15];
            const float fxz = k[12] * rz, fyz = k[13] * rz;
            const float rx = k[22] * sqrtf(fxz * fxz * k[18] * s2 + 0.3f) + 1.5f;
            const float ry = k[22] * sqrtf(fyz * fyz * k[19] * s2 + 0.3f) + 1.5f;
            if (px + rx > 0.0f && px - rx < k[16] && py + ry > 0.0f && py - ry < k[17]) {
                bits |= 1ull << c;
            }
        }
    }
    out_bits[i] = (long long)bits;
}
