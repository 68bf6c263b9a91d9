// Zero-copy gather of host rows into GPU cache slots, straight over PCIe.
// The host rows live in chunks of pinned, mapped memory; row r is at
// chunk_ptrs[r >> chunk_shift] + (r & (2^chunk_shift - 1)) * row_stride floats.
// Only the first `width` columns move (the active SH degree); the slot's gradient is zeroed.
// One thread per float: neighbouring threads read neighbouring columns of a row, so each
// row arrives in full PCIe transactions.

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
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * width) return;
    const long long j = idx / width;
    const int c = (int)(idx - j * width);
    const long long r = rows[j];
    const float* src = reinterpret_cast<const float*>(chunk_ptrs[r >> chunk_shift])
                       + (r & ((1LL << chunk_shift) - 1)) * row_stride;
    const long long dst = slots[j] * out_stride + c;
    out[dst] = src[c];
    if (grad_out != nullptr) grad_out[dst] = 0.0f;
}
