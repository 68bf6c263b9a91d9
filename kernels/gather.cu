// Zero-copy gather of host rows into GPU cache slots, straight over PCIe.
// The host rows live in chunks of pinned, mapped memory: chunk_ptrs[a * n_chunks + c] is chunk c
// of array a (0: parameters, 1 and 2: Adam moments, 3: `last`, the step a row is up to date at),
// and row r is at chunk r >> chunk_shift, row r & (2^chunk_shift - 1), of row_stride floats.
// Only the first `width` columns move (the active SH degree); the slot's gradient is zeroed.
//
// Random rows over PCIe are bound by the requests in flight, not by bytes, so each thread
// moves a 4-float piece of a row with independent loads (one 16-byte load when aligned):
// neighbouring threads cover neighbouring pieces, and a warp keeps many rows in flight.
//
// With `sums` (else null), rows may have skipped Adam steps pending (lazy Adam,
// clm/optim/lazy_adam.py): a row whose `last` step is before `upto` is caught up on the way,
//   p - m / sqrt(v) * sums[segment of the column][last]   (where v > 0),
// in double with the CPU Adam's operations in its order (the _rn intrinsics are never fused), so
// the render sees exactly the parameters the CPU Adam will step from. The host row is left as it
// is: the CPU Adam applies the same skipped steps when it next steps the row. The values
// gathered with steps pending are counted in *caught_up. The moments are read only for those rows, once `last` has
// arrived: reading them with it for every row measured slower (more bytes over PCIe and through
// host memory, which the CPU Adam needs too).

__device__ __forceinline__ void load_piece(float* v, const float* src, int count, bool aligned)
{
    if (aligned) {
        const float4 q = *reinterpret_cast<const float4*>(src);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = k < count ? src[k] : 0.0f;
}

extern "C" __global__ void gather_rows(
    const unsigned long long* __restrict__ chunk_ptrs,  // [4, n_chunks]: param, m, v, last
    const long long n_chunks,
    const int chunk_shift,
    const long long row_stride,
    const long long* __restrict__ rows,   // [n] host row ids
    const long long* __restrict__ slots,  // [n] cache slots
    const long long n,
    const int width,
    float* __restrict__ out,              // [capacity, out_stride]
    float* __restrict__ grad_out,         // [capacity, out_stride] (may be null)
    const long long out_stride,
    const int upto,
    const double* __restrict__ sums,      // [segments, sums_stride] by a row's last (may be null)
    const long long sums_stride,
    const int* __restrict__ column_segment,  // [width]: the row of `sums` of each column
    unsigned long long* __restrict__ caught_up)
{
    const int pieces = (width + 3) >> 2;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    bool counted = false;
    if (idx < n * pieces) {
        const long long j = idx / pieces;
        const int c = (int)(idx - j * pieces) << 2;
        const long long r = rows[j];
        const long long chunk = r >> chunk_shift;
        const long long in_chunk = r & ((1LL << chunk_shift) - 1);
        const long long at = in_chunk * row_stride + c;
        const int count = min(4, width - c);
        const bool aligned = ((row_stride | out_stride) & 3) == 0 && count == 4;
        const int t0 = sums == nullptr
            ? upto
            : reinterpret_cast<const int*>(chunk_ptrs[3 * n_chunks + chunk])[in_chunk];
        float p[4];
        load_piece(p, reinterpret_cast<const float*>(chunk_ptrs[chunk]) + at, count, aligned);
        if (t0 < upto) {
            float m[4], v[4];
            load_piece(m, reinterpret_cast<const float*>(chunk_ptrs[n_chunks + chunk]) + at,
                       count, aligned);
            load_piece(v, reinterpret_cast<const float*>(chunk_ptrs[2 * n_chunks + chunk]) + at,
                       count, aligned);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const double vk = v[k];
                if (k < count && vk > 0.0) {
                    const double s = sums[column_segment[c + k] * sums_stride + t0];
                    const double update = __dmul_rn(__ddiv_rn((double)m[k], __dsqrt_rn(vk)), s);
                    p[k] = __double2float_rn(__dsub_rn((double)p[k], update));
                }
            }
            counted = c == 0;
        }
        const long long dst = slots[j] * out_stride + c;
        if (aligned) {
            *reinterpret_cast<float4*>(out + dst) = make_float4(p[0], p[1], p[2], p[3]);
            if (grad_out != nullptr) {
                *reinterpret_cast<float4*>(grad_out + dst) = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (k < count) {
                    out[dst + k] = p[k];
                    if (grad_out != nullptr) grad_out[dst + k] = 0.0f;
                }
            }
        }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, counted);
    if ((threadIdx.x & 31) == 0 && ballot != 0u) {
        atomicAdd(caught_up, (unsigned long long)__popc(ballot) * (unsigned long long)width);
    }
}
