// Dense Adam over the first `width` columns of a row table, in one pass over memory.
//
// torch.optim.Adam (single tensor, no weight decay) takes seven kernels and a temporary for
// this: lerp_, mul_, addcmul_, sqrt, a division, add_ and addcdiv_ each read and write whole
// tensors. Here each element is read once and written once, with the same float operations in
// the same order, each rounded as torch's own CUDA kernels round it:
// - lerp_ is ATen's: self + w * (end - self) for a weight under 0.5, else
//   end - (end - self) * (1 - w), each a fused multiply-add;
// - addcmul_ is a + alpha * (b * c), addcdiv_ is a + alpha * (b / c), fused multiply-adds;
// - dividing by a Python scalar multiplies by its reciprocal, taken in double and rounded to
//   float;
// - the separate kernels round between steps, which the _rn intrinsics keep (no contraction
//   across them).
// So a row stepped here holds torch's bits (tests/test_gpu_adam.py checks them).

#define ROWS_PER_BLOCK 64

extern "C" __global__ void adam_columns(
    float* __restrict__ param,              // [n, stride]: columns [0, width) are stepped
    float* __restrict__ exp_avg,            // [n, stride]
    float* __restrict__ exp_avg_sq,         // [n, stride]
    const long long stride,
    float* __restrict__ grad,               // [n, grad_stride]
    const long long grad_stride,
    const long long n,
    const int width,
    const float* __restrict__ step_size,    // [width]: -lr / bc1 of each column
    const float weight,                     // 1 - b1, the first moment's lerp weight
    const float b2,
    const float one_minus_b2,
    const float inv_bc2_sqrt,               // 1 / sqrt(1 - b2^t), in double, then rounded
    const float eps,
    const int zero_grad)                    // leave zeros in grad for the next step
{
    const long long first = (long long)blockIdx.x * ROWS_PER_BLOCK;
    const int rows = (int)min((long long)ROWS_PER_BLOCK, n - first);
    const bool small = fabsf(weight) < 0.5f;
    const float keep = __fsub_rn(1.0f, weight);
    for (int j = threadIdx.x; j < rows * width; j += blockDim.x) {
        const int r = j / width;
        const int c = j - r * width;
        const long long at = (first + r) * stride + c;
        const long long ga = (first + r) * grad_stride + c;
        const float g = grad[ga];
        float m = exp_avg[at];
        const float diff = __fsub_rn(g, m);
        m = small ? __fmaf_rn(weight, diff, m) : __fmaf_rn(-diff, keep, g);
        float v = __fmul_rn(exp_avg_sq[at], b2);
        v = __fmaf_rn(one_minus_b2, __fmul_rn(g, g), v);
        const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), inv_bc2_sqrt), eps);
        param[at] = __fmaf_rn(step_size[c], __fdiv_rn(m, denom), param[at]);
        exp_avg[at] = m;
        exp_avg_sq[at] = v;
        if (zero_grad) grad[ga] = 0.0f;
    }
}
