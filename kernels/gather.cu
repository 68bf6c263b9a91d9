// Zero-copy gather of host rows into GPU cache slots, straight over PCIe.
// The host rows live in chunks of pinned, mapped memory; row r is at
// chunk_ptrs[r >> chunk_shift] + (r & (2^chunk_shift - 1)) * row_stride floats.
// Only the first `width` columns move (the active SH degree); the slot's gradient is zeroed.
//
// Random rows over PCIe are bound by the requests in flight, not by bytes, so each thread
// moves a 4-float piece of a row with independent loads (one 16-byte load when aligned):
// neighbouring threads cover neighbouring pieces, and a warp keeps many rows in flight.

extern "C" __global__ void gather_rows(
    const unsigned long long* __restrict__ chunk_ptrs,
    const int chunk_shift,
    const long long row_stride,
    const long long* __restrict__ rows,   // [n] host row ids
    const long long* __restrict__ slots,  // [n] cache slots
    const long long n,
    const int width,
    float* __restrict__ out,              // [capacity, out_stride]
    float* __restrict__ grad_out,         // [capacity, out_stride] (may be null)
    const long long out_stride)
{
    const int pieces = (width + 3) >> 2;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * pieces) return;
    const long long j = idx / pieces;
    const int c = (int)(idx - j * pieces) << 2;
    const long long r = rows[j];
    const float* src = reinterpret_cast<const float*>(chunk_ptrs[r >> chunk_shift])
                       + (r & ((1LL << chunk_shift) - 1)) * row_stride + c;
    const long long dst = slots[j] * out_stride + c;
    const bool aligned = ((row_stride | out_stride) & 3) == 0 && c + 4 <= width;
    if (aligned) {
        const float4 v = *reinterpret_cast<const float4*>(src);
        *reinterpret_cast<float4*>(out + dst) = v;
        if (grad_out != nullptr) {
            *reinterpret_cast<float4*>(grad_out + dst) = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        return;
    }
    const int count = min(4, width - c);
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if (k < count) v[k] = src[k];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if (k < count) {
            out[dst + k] = v[k];
            if (grad_out != nullptr) grad_out[dst + k] = 0.0f;
        }
    }
}
