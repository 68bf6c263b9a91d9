// Gradient rows that hold any nonzero value, packed in order into pinned host memory with
// zero-copy writes over PCIe: a row whose batch gradient is zero (culled in, but occluded or
// under the alpha threshold everywhere) moves nothing back.
//
// kept[j] is the inclusive count of kept rows up to row j (a prefix sum of "any nonzero"), so
// row j goes to output row kept[j] - 1 when kept[j] moved, in the order of the input. Each
// thread moves a 4-float piece of one row, as gather.cu does the other way.

extern "C" __global__ void compact_rows(
    const float* __restrict__ grads,      // [n, width], contiguous
    const long long* __restrict__ ids,    // [n] row ids
    const long long* __restrict__ kept,   // [n] inclusive prefix count of kept rows
    const long long n,
    const int width,
    float* __restrict__ out_grads,        // [>= kept[n-1], width], pinned host memory
    long long* __restrict__ out_ids)      // [>= kept[n-1]], pinned host memory
{
    const int pieces = (width + 3) >> 2;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * pieces) return;
    const long long j = idx / pieces;
    const int c = (int)(idx - j * pieces) << 2;
    const long long before = j > 0 ? kept[j - 1] : 0;
    if (kept[j] == before) return;  // no gradient: stays on the GPU
    const float* src = grads + j * (long long)width + c;
    float* dst = out_grads + before * (long long)width + c;
    const int count = min(4, width - c);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if (k < count) dst[k] = src[k];
    }
    if (c == 0) out_ids[before] = ids[j];
}
