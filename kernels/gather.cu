// Zero-copy gather of host rows into GPU cache slots, straight over PCIe.
// The host rows live in chunks of pinned, mapped memory: chunk_ptrs[a * n_chunks + c] is chunk c
// of array a (0: parameters, 1 and 2: Adam moments, 3: `last`, the step a row is up to date at),
// and row r is at chunk r >> chunk_shift, row r & (2^chunk_shift - 1), of row_stride floats.
// Only the first `width` columns move (the active SH degree); the slot's gradient is zeroed.
//
// Random rows over PCIe are bound by the requests in flight, not by bytes, so each thread
// moves 4-float pieces of rows (one 16-byte load when aligned), PIECES_AT_ONCE of them with
// their loads issued together: neighbouring threads cover neighbouring pieces, and a warp keeps
// many rows in flight. The grid is small (a block for every four SMs, each thread striding over
// the pieces), so the render this overlaps has the other SMs to itself (clm/offload/gather.py).
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

constexpr int PIECES_AT_ONCE = 4;

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
    const long long total = n * pieces;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long mask = (1LL << chunk_shift) - 1;
    unsigned counted = 0;
    for (long long base = (long long)blockIdx.x * blockDim.x + threadIdx.x; base < total;
         base += stride * PIECES_AT_ONCE) {
        long long j[PIECES_AT_ONCE], chunk[PIECES_AT_ONCE], in_chunk[PIECES_AT_ONCE];
        int c[PIECES_AT_ONCE], t0[PIECES_AT_ONCE];
        float p[PIECES_AT_ONCE][4];
#pragma unroll
        for (int u = 0; u < PIECES_AT_ONCE; ++u) {
            const long long idx = base + u * stride;
            j[u] = idx < total ? idx / pieces : -1;
            c[u] = j[u] >= 0 ? (int)(idx - j[u] * pieces) << 2 : 0;
            const long long r = j[u] >= 0 ? rows[j[u]] : 0;
            chunk[u] = r >> chunk_shift;
            in_chunk[u] = r & mask;
        }
#pragma unroll
        for (int u = 0; u < PIECES_AT_ONCE; ++u) {
            if (j[u] < 0) continue;
            const int count = min(4, width - c[u]);
            const bool aligned = ((row_stride | out_stride) & 3) == 0 && count == 4;
            t0[u] = sums == nullptr
                ? upto
                : reinterpret_cast<const int*>(chunk_ptrs[3 * n_chunks + chunk[u]])[in_chunk[u]];
            load_piece(p[u], reinterpret_cast<const float*>(chunk_ptrs[chunk[u]])
                                 + in_chunk[u] * row_stride + c[u], count, aligned);
        }
#pragma unroll
        for (int u = 0; u < PIECES_AT_ONCE; ++u) {
            if (j[u] < 0) continue;
            const int count = min(4, width - c[u]);
            const bool aligned = ((row_stride | out_stride) & 3) == 0 && count == 4;
            if (t0[u] < upto) {
                const long long at = in_chunk[u] * row_stride + c[u];
                float m[4], v[4];
                load_piece(m, reinterpret_cast<const float*>(chunk_ptrs[n_chunks + chunk[u]]) + at,
                           count, aligned);
                load_piece(v, reinterpret_cast<const float*>(chunk_ptrs[2 * n_chunks + chunk[u]]) + at,
                           count, aligned);
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const double vk = v[k];
                    if (k < count && vk > 0.0) {
                        const double s = sums[column_segment[c[u] + k] * sums_stride + t0[u]];
                        const double update = __dmul_rn(__ddiv_rn((double)m[k], __dsqrt_rn(vk)), s);
                        p[u][k] = __double2float_rn(__dsub_rn((double)p[u][k], update));
                    }
                }
                counted += c[u] == 0;
            }
            const long long dst = slots[j[u]] * out_stride + c[u];
            if (aligned) {
                *reinterpret_cast<float4*>(out + dst) = make_float4(p[u][0], p[u][1], p[u][2], p[u][3]);
                if (grad_out != nullptr) {
                    *reinterpret_cast<float4*>(grad_out + dst) = make_float4(0.f, 0.f, 0.f, 0.f);
                }
            } else {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    if (k < count) {
                        out[dst + k] = p[u][k];
                        if (grad_out != nullptr) grad_out[dst + k] = 0.0f;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) counted += __shfl_down_sync(0xffffffffu, counted, off);
    if ((threadIdx.x & 31) == 0 && counted != 0u) {
        atomicAdd(caught_up, (unsigned long long)counted * (unsigned long long)width);
    }
}
