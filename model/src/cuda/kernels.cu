// marathon's CUDA kernels, compiled at run time by NVRTC (see `cuda::Gpu::new`).
//
// Self-contained: no CUDA headers. bf16 values travel as their 16 raw bits (`bf16`) and are
// widened to fp32 for all arithmetic; every reduction accumulates in fp32 (or fp64 for the
// gradient norm). Each kernel mirrors a CPU kernel of `model::kernels`, whose doc comments give
// the maths; layouts are the CPU's, row-major.

typedef unsigned short bf16;
typedef unsigned int u32;

__device__ __forceinline__ float b2f(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// Round to nearest even, as `half::bf16::from_f32`; NaN stays NaN.
__device__ __forceinline__ bf16 f2b(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
    return (unsigned int)f2b(lo) | ((unsigned int)f2b(hi) << 16);
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Sum over a block of up to 1024 threads; every thread gets the result. `buf` holds 32 floats.
__device__ float block_sum(float x, float* buf) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    x = warp_sum(x);
    __syncthreads();
    if (lane == 0) buf[warp] = x;
    __syncthreads();
    x = lane < warps ? buf[lane] : 0.0f;
    return warp_sum(x);
}

__device__ float block_max(float x, float* buf) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) buf[warp] = x;
    __syncthreads();
    x = lane < warps ? buf[lane] : -3.402823466e38f;
    return warp_max(x);
}

// ------------------------------------------------------------------------------------------
// Conversions and elementwise helpers

extern "C" __global__ void cast_f32_bf16(bf16* out, const float* in, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = f2b(in[i]);
}

extern "C" __global__ void cast_bf16_f32(float* out, const bf16* in, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = b2f(in[i]);
}

// out (rows, C) += residual (rows, C) + bias (C): a projection's fp32 output joins the residual
// stream, the bias added once (`kernels::residual_bias_add`).
extern "C" __global__ void residual_bias_add(float* out, const float* res, const bf16* bias, long rows, int c) {
    long n = rows * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] += res[i] + b2f(bias[i % c]);
}

// ------------------------------------------------------------------------------------------
// Embeddings

// out (BT, C) = wte[token] + wpe[t]; a token outside this rank's vocabulary slice [v0, v0+vl)
// contributes zero (`kernels::embedding_forward` then `position_forward`). A null `wpe` leaves
// the positions out, for a vocabulary-parallel lookup whose sum comes first.
extern "C" __global__ void embedding_forward(float* out, const u32* tokens, const bf16* wte, const bf16* wpe,
                                             long bt, int t, int c, int v0, int vl) {
    long n = bt * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long row = i / c;
        int col = (int)(i % c);
        int pos = (int)(row % t);
        int tok = (int)tokens[row] - v0;
        float e = (tok >= 0 && tok < vl) ? b2f(wte[(long)tok * c + col]) : 0.0f;
        out[i] = wpe ? e + b2f(wpe[(long)pos * c + col]) : e;
    }
}

// dwte[token - v0] += dout (rows of this rank's slice only). Atomic: rows that share a token
// add into one embedding row.
extern "C" __global__ void embedding_backward(float* dwte, const float* dout, const u32* tokens, long bt, int c,
                                              int v0, int vl) {
    long n = bt * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long row = i / c;
        int tok = (int)tokens[row] - v0;
        if (tok >= 0 && tok < vl) atomicAdd(&dwte[(long)tok * c + (i % c)], dout[i]);
    }
}

// dwpe[t] += sum over the batch of dout[b, t]: one thread per (t, c), in a fixed order.
extern "C" __global__ void position_backward(float* dwpe, const float* dout, int b, int t, int c) {
    long n = (long)t * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int bi = 0; bi < b; bi++) s += dout[(long)bi * n + i];
        dwpe[i] += s;
    }
}

// out[b, t] += wpe[t]: the positions, added once after a vocabulary-parallel lookup's sum
// (`kernels::position_forward`).
extern "C" __global__ void position_forward(float* out, const bf16* wpe, long bt, int t, int c) {
    long n = bt * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int pos = (int)((i / c) % t);
        out[i] += b2f(wpe[(long)pos * c + (i % c)]);
    }
}

// ------------------------------------------------------------------------------------------
// LayerNorm: one warp per row.

extern "C" __global__ void layernorm_forward(bf16* out, float* mean, float* rstd, const float* inp,
                                             const bf16* w, const bf16* b, long rows, int c) {
    long row = blockIdx.x * (long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* x = inp + row * c;
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) s += x[i];
    float mu = warp_sum(s) / c;
    float v = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float d = x[i] - mu;
        v += d * d;
    }
    float rs = rsqrtf(warp_sum(v) / c + 1e-5f);
    bf16* o = out + row * c;
    for (int i = lane; i < c; i += 32) o[i] = f2b((x[i] - mu) * rs * b2f(w[i]) + b2f(b[i]));
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

// dinp += dL/dinp, one warp per row (`kernels::layernorm_backward`, input part).
extern "C" __global__ void layernorm_backward(float* dinp, const bf16* dout, const float* inp, const float* mean,
                                              const float* rstd, const bf16* w, long rows, int c) {
    long row = blockIdx.x * (long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* x = inp + row * c;
    const bf16* d = dout + row * c;
    float mu = mean[row], rs = rstd[row];
    float dm = 0.0f, dnm = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float norm = (x[i] - mu) * rs;
        float dn = b2f(w[i]) * b2f(d[i]);
        dm += dn;
        dnm += dn * norm;
    }
    dm = warp_sum(dm) / c;
    dnm = warp_sum(dnm) / c;
    float* di = dinp + row * c;
    for (int i = lane; i < c; i += 32) {
        float norm = (x[i] - mu) * rs;
        float dn = b2f(w[i]) * b2f(d[i]);
        di[i] += (dn - dm - norm * dnm) * rs;
    }
}

// Column reductions over rows, for LayerNorm's weight and bias gradients and a linear layer's
// bias gradient. Block (32, 8): 32 columns, 8 row lanes; each block sums a run of rows and adds
// into the fp32 gradient atomically.
#define COL_ROWS 256
extern "C" __global__ void layernorm_param_backward(float* dw, float* db, const bf16* dout, const float* inp,
                                                    const float* mean, const float* rstd, long rows, int c) {
    __shared__ float sw[8][33], sb[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    long r0 = (long)blockIdx.y * COL_ROWS;
    float aw = 0.0f, ab = 0.0f;
    if (col < c) {
        for (long r = r0 + threadIdx.y; r < rows && r < r0 + COL_ROWS; r += 8) {
            float d = b2f(dout[r * c + col]);
            ab += d;
            aw += (inp[r * c + col] - mean[r]) * rstd[r] * d;
        }
    }
    sw[threadIdx.y][threadIdx.x] = aw;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && col < c) {
        for (int k = 1; k < 8; k++) {
            aw += sw[k][threadIdx.x];
            ab += sb[k][threadIdx.x];
        }
        atomicAdd(&dw[col], aw);
        atomicAdd(&db[col], ab);
    }
}

// As above for a bias: 64 columns a block, a pair of bf16 per thread (OC is even).
extern "C" __global__ void bias_backward(float* dbias, const bf16* dout, long rows, int oc) {
    __shared__ float sb[8][65];
    int col = blockIdx.x * 64 + threadIdx.x * 2;
    long r0 = (long)blockIdx.y * COL_ROWS;
    float a0 = 0.0f, a1 = 0.0f;
    if (col < oc) {
        for (long r = r0 + threadIdx.y; r < rows && r < r0 + COL_ROWS; r += 8) {
            u32 p = *(const u32*)(dout + r * oc + col);
            a0 += b2f((bf16)(p & 0xffffu));
            a1 += b2f((bf16)(p >> 16));
        }
    }
    sb[threadIdx.y][2 * threadIdx.x] = a0;
    sb[threadIdx.y][2 * threadIdx.x + 1] = a1;
    __syncthreads();
    if (threadIdx.y == 0 && col < oc) {
        for (int k = 1; k < 8; k++) {
            a0 += sb[k][2 * threadIdx.x];
            a1 += sb[k][2 * threadIdx.x + 1];
        }
        atomicAdd(&dbias[col], a0);
        atomicAdd(&dbias[col + 1], a1);
    }
}

// ------------------------------------------------------------------------------------------
// GELU, tanh approximation

__device__ __forceinline__ float gelu(float v) {
    const float s = 0.7978845608028654f;
    return 0.5f * v * (1.0f + tanhf(s * (v + 0.044715f * v * v * v)));
}

__device__ __forceinline__ float gelu_grad(float v) {
    const float s = 0.7978845608028654f;
    float th = tanhf(s * (v + 0.044715f * v * v * v));
    return 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * s * (1.0f + 3.0f * 0.044715f * v * v);
}

// Pairs of bf16 at a time (n is even and the buffers 4-byte aligned).
extern "C" __global__ void gelu_forward(bf16* out, const bf16* inp, long n) {
    const u32* in2 = (const u32*)inp;
    u32* out2 = (u32*)out;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n / 2; i += (long)gridDim.x * blockDim.x) {
        u32 p = in2[i];
        out2[i] = pack2(gelu(b2f((bf16)(p & 0xffffu))), gelu(b2f((bf16)(p >> 16))));
    }
}

// d = d * gelu'(inp), in place.
extern "C" __global__ void gelu_backward(bf16* d, const bf16* inp, long n) {
    const u32* in2 = (const u32*)inp;
    u32* d2 = (u32*)d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n / 2; i += (long)gridDim.x * blockDim.x) {
        u32 p = in2[i], g = d2[i];
        float g0 = b2f((bf16)(g & 0xffffu)) * gelu_grad(b2f((bf16)(p & 0xffffu)));
        float g1 = b2f((bf16)(g >> 16)) * gelu_grad(b2f((bf16)(p >> 16)));
        d2[i] = pack2(g0, g1);
    }
}

// ------------------------------------------------------------------------------------------
// Attention. qkv (B, T, 3C) holds [q | k | v], head h in columns h*hs..(h+1)*hs of each part;
// the products run on (B, NH, T, hs) copies, batched over (b, h).

// Where element i of a (B, NH, T, hs) tensor sits in a (B, T, width) one: row (b, t), columns
// h*hs + d.
__device__ __forceinline__ long head_offset(long i, int t, int nh, int hs, long width) {
    int d = (int)(i % hs);
    long r = i / hs;
    int ti = (int)(r % t);
    r /= t;
    int h = (int)(r % nh);
    long bi = r / nh;
    return (bi * t + ti) * width + (long)h * hs + d;
}

// q, k, v (B, NH, T, hs) from qkv (B, T, 3C).
extern "C" __global__ void attention_split(bf16* q, bf16* k, bf16* v, const bf16* qkv, int b, int t, int nh, int hs) {
    long c = (long)nh * hs, n = (long)b * t * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long src = head_offset(i, t, nh, hs, 3 * c);
        q[i] = qkv[src];
        k[i] = qkv[src + c];
        v[i] = qkv[src + 2 * c];
    }
}

// out (B, T, C) from y (B, NH, T, hs), heads concatenated in order.
extern "C" __global__ void attention_merge(bf16* out, const bf16* y, int b, int t, int nh, int hs) {
    long c = (long)nh * hs, n = (long)b * t * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[head_offset(i, t, nh, hs, c)] = y[i];
}

// The inverse of `attention_merge`: dy (B, NH, T, hs) from dout (B, T, C).
extern "C" __global__ void attention_unmerge(bf16* dy, const bf16* dout, int b, int t, int nh, int hs) {
    long c = (long)nh * hs, n = (long)b * t * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        dy[i] = dout[head_offset(i, t, nh, hs, c)];
}

// The inverse of `attention_split`: dqkv (B, T, 3C) from dq, dk, dv (B, NH, T, hs).
extern "C" __global__ void attention_join(bf16* dqkv, const bf16* dq, const bf16* dk, const bf16* dv, int b, int t,
                                          int nh, int hs) {
    long c = (long)nh * hs, n = (long)b * t * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long dst = head_offset(i, t, nh, hs, 3 * c);
        dqkv[dst] = dq[i];
        dqkv[dst + c] = dk[i];
        dqkv[dst + 2 * c] = dv[i];
    }
}

// Causal softmax of each row of scores (rows of T), in place: row i keeps columns 0..=i, the
// rest become zero. One warp per row; the scores already carry the 1/sqrt(hs) scale.
extern "C" __global__ void softmax_causal_forward(bf16* att, long rows, int t) {
    long row = blockIdx.x * (long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    int i = (int)(row % t);
    bf16* a = att + row * t;
    float mx = -3.402823466e38f;
    for (int j = lane; j <= i; j += 32) mx = fmaxf(mx, b2f(a[j]));
    mx = warp_max(mx);
    float s = 0.0f;
    for (int j = lane; j <= i; j += 32) s += __expf(b2f(a[j]) - mx);
    float inv = 1.0f / warp_sum(s);
    for (int j = lane; j < t; j += 32) a[j] = j <= i ? f2b(__expf(b2f(a[j]) - mx) * inv) : (bf16)0;
}

// datt = att * (datt - sum_j att_j datt_j) * scale, in place, zero above the diagonal.
extern "C" __global__ void softmax_causal_backward(bf16* datt, const bf16* att, long rows, int t, float scale) {
    long row = blockIdx.x * (long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    int i = (int)(row % t);
    const bf16* a = att + row * t;
    bf16* d = datt + row * t;
    float s = 0.0f;
    for (int j = lane; j <= i; j += 32) s += b2f(a[j]) * b2f(d[j]);
    s = warp_sum(s);
    for (int j = lane; j < t; j += 32) d[j] = j <= i ? f2b(b2f(a[j]) * (b2f(d[j]) - s) * scale) : (bf16)0;
}

// ------------------------------------------------------------------------------------------
// Cross-entropy over the real vocabulary `v`, one block per row of `vl` logits (this rank's
// slice, from vocabulary id `v0`; single-rank here: v0 = 0 and the slice is every column).
// Adds each row's loss into `losses`; with `dloss` > 0 it also turns the logits into
// dL/dlogits = (p - onehot(target)) * dloss in place, padding columns zero.

// Online softmax statistics: (max, sum of exp(x - max)) merged pairwise.
__device__ __forceinline__ void ms_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * __expf(m - x) + 1.0f;
        m = x;
    } else {
        s += __expf(x - m);
    }
}

__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    s = (m == -3.402823466e38f ? 0.0f : s * __expf(m - mx)) + (m2 == -3.402823466e38f ? 0.0f : s2 * __expf(m2 - mx));
    m = mx;
}

// Merges every thread's (max, sum) of a block of up to 1024 threads; every thread gets the
// block's.
__device__ __forceinline__ void block_ms(float& m, float& s) {
    __shared__ float bm[32], bs[32];
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        ms_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        bm[warp] = m;
        bs[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? bm[lane] : -3.402823466e38f;
    s = lane < warps ? bs[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        ms_merge(m, s, m2, s2);
    }
}

extern "C" __global__ void crossentropy(float* losses, bf16* logits, const u32* targets, int vl, int v0, int v,
                                        float dloss) {
    long row = blockIdx.x;
    bf16* l = logits + row * vl;
    const u32* l2 = (const u32*)l;  // pairs of logits: vl is even and rows start 4-byte aligned
    int real = v - v0;
    if (real > vl) real = vl;
    if (real < 0) real = 0;
    // One pass for the maximum and the sum of exponentials.
    float m = -3.402823466e38f, s = 0.0f;
    for (int j = threadIdx.x; 2 * j < real; j += blockDim.x) {
        u32 p = l2[j];
        ms_add(m, s, b2f((bf16)(p & 0xffffu)));
        if (2 * j + 1 < real) ms_add(m, s, b2f((bf16)(p >> 16)));
    }
    block_ms(m, s);
    int tgt = (int)targets[row] - v0;
    if (threadIdx.x == 0) losses[row] += logf(s) - (b2f(l[tgt]) - m);
    if (dloss > 0.0f) {
        __syncthreads();  // thread 0 has read the target's logit
        float inv = 1.0f / s;
        u32* w2 = (u32*)l;
        for (int j = threadIdx.x; 2 * j < vl; j += blockDim.x) {
            u32 p = w2[j];
            int c0 = 2 * j, c1 = 2 * j + 1;
            float g0 = c0 < real ? (__expf(b2f((bf16)(p & 0xffffu)) - m) * inv - (c0 == tgt ? 1.0f : 0.0f)) * dloss : 0.0f;
            float g1 = c1 < real ? (__expf(b2f((bf16)(p >> 16)) - m) * inv - (c1 == tgt ? 1.0f : 0.0f)) * dloss : 0.0f;
            w2[j] = pack2(g0, g1);
        }
    }
}

// The vocabulary-parallel cross-entropy, for a rank holding `vl` logits of each row from id
// `v0`, in two kernels around one all-gather. `crossentropy_partial` writes this rank's
// statistics of each row into stats (3, rows): the maximum and the sum of exp(x - max) over its
// real columns, and the target's logit when the target falls in its slice (else 0).
extern "C" __global__ void crossentropy_partial(float* stats, const bf16* logits, const u32* targets, long rows,
                                                int vl, int v0, int v) {
    long row = blockIdx.x;
    const bf16* l = logits + row * vl;
    int real = v - v0;
    if (real > vl) real = vl;
    if (real < 0) real = 0;
    float m = -3.402823466e38f, s = 0.0f;
    for (int j = threadIdx.x; j < real; j += blockDim.x) ms_add(m, s, b2f(l[j]));
    block_ms(m, s);
    if (threadIdx.x == 0) {
        int tgt = (int)targets[row] - v0;
        stats[row] = m;
        stats[rows + row] = s;
        stats[2 * rows + row] = (tgt >= 0 && tgt < real) ? b2f(l[tgt]) : 0.0f;
    }
}

// Merges every rank's statistics, `all` (tp, 3, rows) in rank order, so every rank computes the
// same row maximum and sum; adds each row's loss into `losses`, and with `dloss` > 0 turns this rank's logits into dL/dlogits in place.
extern "C" __global__ void crossentropy_finish(float* losses, bf16* logits, const float* all, const u32* targets,
                                               long rows, int tp, int vl, int v0, int v, float dloss) {
    long row = blockIdx.x;
    float m = -3.402823466e38f, s = 0.0f;
    for (int r = 0; r < tp; r++) ms_merge(m, s, all[(long)r * 3 * rows + row], all[((long)r * 3 + 1) * rows + row]);
    int target = (int)targets[row];
    int owner = target / vl;
    float tl = all[((long)owner * 3 + 2) * rows + row];
    if (threadIdx.x == 0) losses[row] += logf(s) - (tl - m);
    if (dloss > 0.0f) {
        bf16* l = logits + row * vl;
        int real = v - v0;
        if (real > vl) real = vl;
        float inv = 1.0f / s;
        for (int j = threadIdx.x; j < vl; j += blockDim.x) {
            float g = j < real ? (__expf(b2f(l[j]) - m) * inv - (j + v0 == target ? 1.0f : 0.0f)) * dloss : 0.0f;
            l[j] = f2b(g);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Optimizer

// Sum of squares in fp64 over the union of `nranges` ranges (start, end pairs) of x (the
// elements of the gradient norm a rank counts): per-block partials, then one block sums them
// in a fixed order.
extern "C" __global__ void sum_squares_partial(double* partials, const float* x, const long* ranges,
                                               int nranges) {
    __shared__ double buf[32];
    double s = 0.0;
    for (int r = 0; r < nranges; r++) {
        for (long i = ranges[2 * r] + blockIdx.x * (long)blockDim.x + threadIdx.x; i < ranges[2 * r + 1];
             i += (long)gridDim.x * blockDim.x) {
            double v = x[i];
            s += v * v;
        }
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) buf[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < (blockDim.x + 31) >> 5; w++) t += buf[w];
        partials[blockIdx.x] = t;
    }
}

extern "C" __global__ void sum_squares_finish(double* out, const double* partials, int parts) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < parts; i++) t += partials[i];
        out[0] = t;
    }
}

// AdamW with fp32 master weights (`optim::AdamW::update` after `optim::clip_grads`): the
// gradient is scaled by max_norm / (norm + 1e-6) when that is below one, the norm read from
// `norm_sq` on the device; `decay[i]` says whether element i takes weight decay. Writes the
// master weight and its bf16 copy.
extern "C" __global__ void adamw(float* master, bf16* params, const float* grads, float* m, float* v,
                                 const unsigned char* decay, long n, float lr, float b1, float b2, float one_b1,
                                 float one_b2, float inv_bc1, float inv_bc2, float eps, float wd,
                                 const double* norm_sq, double max_norm) {
    double coef = max_norm / (sqrt(norm_sq[0]) + 1e-6);
    float scale = coef < 1.0 ? (float)coef : 1.0f;
    bool clip = coef < 1.0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = clip ? grads[i] * scale : grads[i];
        float mi = b1 * m[i] + one_b1 * g;
        float vi = b2 * v[i] + one_b2 * g * g;
        m[i] = mi;
        v[i] = vi;
        float mh = mi * inv_bc1, vh = vi * inv_bc2;
        float p = master[i];
        p -= lr * (mh / (sqrtf(vh) + eps) + (decay[i] ? wd : 0.0f) * p);
        master[i] = p;
        params[i] = f2b(p);
    }
}

// ------------------------------------------------------------------------------------------
// Fused causal attention for heads of 64 (FlashAttention-2's scheme): the T x T scores never
// reach device memory. Tensor cores through mma.sync m16n8k16 (bf16 in, fp32 accumulate; sm_80
// and later). A block of 4 warps takes 64 rows; each warp 16 of them, its operand fragments in
// registers. Softmax runs in the log2 domain: `scale_log2` is 1/sqrt(hs) * log2(e), and `lse`
// keeps each row's log2-sum-exp2 for backward. Backward runs as two kernels, one over key
// blocks (dK, dV) and one over query blocks (dQ), so no gradient needs atomics.

#define FA_HS 64
#define INFINITY __int_as_float(0x7f800000)
#define FA_STR 72  // shared-memory row stride in bf16: 64 plus 8 of padding against bank conflicts

__device__ __forceinline__ void mma16816(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}


__device__ __forceinline__ u32 ld2(const bf16* p) { return *(const u32*)p; }

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Starts copying rows r0..r0+63 (row stride `ld`) of 64 values into shared memory s[row][col]
// with cp.async, 16 bytes a thread at a time; rows at or beyond `t` are zero-filled.
__device__ __forceinline__ void fa_load_tile(bf16* s, const bf16* g, long ld, int r0, int t) {
    for (int i = threadIdx.x; i < 64 * 8; i += blockDim.x) {
        int r = i >> 3, c = (i & 7) * 8;
        bool in = r0 + r < t;
        const bf16* src = g + (long)(in ? r0 + r : 0) * ld + c;
        u32 dst = smem_addr(s + r * FA_STR + c);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(in ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;");
}

__device__ __forceinline__ void fa_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// A warp's A operand: rows q0..q0+15 by 64 columns, as four 16-wide k-steps.
__device__ void fa_load_a(u32 a[4][4], const bf16* g, long ld, int q0, int t, int lane) {
    int r0 = q0 + (lane >> 2), r1 = r0 + 8, c = 2 * (lane & 3);
    for (int kk = 0; kk < 4; kk++) {
        int cc = kk * 16 + c;
        a[kk][0] = r0 < t ? ld2(g + (long)r0 * ld + cc) : 0u;
        a[kk][1] = r1 < t ? ld2(g + (long)r1 * ld + cc) : 0u;
        a[kk][2] = r0 < t ? ld2(g + (long)r0 * ld + cc + 8) : 0u;
        a[kk][3] = r1 < t ? ld2(g + (long)r1 * ld + cc + 8) : 0u;
    }
}

__device__ __forceinline__ void ldsm4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm4t(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// acc (16 x 64, eight 8-wide tiles) += A (16 x 64) @ X^T, X in shared memory as X[n][k]. Each
// ldmatrix.x4 fetches the B fragments of two k-steps of one n-tile.
__device__ __forceinline__ void fa_mma_abt(float acc[8][4], const u32 a[4][4], const bf16* x, int lane) {
    int m = lane >> 3, row = lane & 7;
#pragma unroll
    for (int j = 0; j < 8; j++) {
#pragma unroll
        for (int kk = 0; kk < 4; kk += 2) {
            u32 b[4];
            ldsm4(b, smem_addr(x + (8 * j + row) * FA_STR + (kk + (m >> 1)) * 16 + (m & 1) * 8));
            mma16816(acc[j], a[kk], b[0], b[1]);
            mma16816(acc[j], a[kk + 1], b[2], b[3]);
        }
    }
}

// acc (16 x 64) += A (16 x 64) @ X, X in shared memory as X[k][n] (transposed on the fly).
__device__ __forceinline__ void fa_mma_ab(float acc[8][4], const u32 a[4][4], const bf16* x, int lane) {
    int m = lane >> 3, row = lane & 7;
#pragma unroll
    for (int j = 0; j < 8; j++) {
#pragma unroll
        for (int kk = 0; kk < 4; kk += 2) {
            u32 b[4];
            ldsm4t(b, smem_addr(x + ((kk + (m >> 1)) * 16 + (m & 1) * 8 + row) * FA_STR + 8 * j));
            mma16816(acc[j], a[kk], b[0], b[1]);
            mma16816(acc[j], a[kk + 1], b[2], b[3]);
        }
    }
}

// An accumulator (16 x 64) as the A operand of the next product, rounded to bf16.
__device__ __forceinline__ void fa_acc_to_a(u32 a[4][4], float acc[8][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        a[kk][0] = pack2(acc[2 * kk][0], acc[2 * kk][1]);
        a[kk][1] = pack2(acc[2 * kk][2], acc[2 * kk][3]);
        a[kk][2] = pack2(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
        a[kk][3] = pack2(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
    }
}

// Writes a warp's 16 x 64 accumulator, scaled per row, to rows r0..r0+15 (row stride `ld`).
__device__ void fa_store(bf16* g, long ld, float acc[8][4], int r0, int t, float s0, float s1, int lane) {
    int a = r0 + (lane >> 2), b = a + 8, c = 2 * (lane & 3);
    for (int j = 0; j < 8; j++) {
        if (a < t) *(u32*)(g + (long)a * ld + 8 * j + c) = pack2(acc[j][0] * s0, acc[j][1] * s0);
        if (b < t) *(u32*)(g + (long)b * ld + 8 * j + c) = pack2(acc[j][2] * s1, acc[j][3] * s1);
    }
}

// out (B, T, C) and lse (B, NH, T) from qkv (B, T, 3C). Grid (ceil(T/64), B*NH), 128 threads.
// Key and value tiles are double-buffered: the next one loads while this one is used.
extern "C" __global__ void __launch_bounds__(128) flash_forward(bf16* out, float* lse, const bf16* qkv, int t, int nh,
                                                                float scale_log2) {
    __shared__ __align__(16) bf16 ks[2][64 * FA_STR];
    __shared__ __align__(16) bf16 vs[2][64 * FA_STR];
    int qb = blockIdx.x, bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    int c = nh * FA_HS;
    long ld = 3L * c;
    const bf16* q = qkv + (long)bi * t * ld + h * FA_HS;
    const bf16* k = q + c;
    const bf16* v = q + 2 * c;
    int lane = threadIdx.x & 31, q0 = qb * 64 + (threadIdx.x >> 5) * 16;
    int r0 = q0 + (lane >> 2), r1 = r0 + 8, cc = 2 * (lane & 3);
    fa_load_tile(ks[0], k, ld, 0, t);
    fa_load_tile(vs[0], v, ld, 0, t);
    u32 qa[4][4];
    fa_load_a(qa, q, ld, q0, t, lane);
    float o[8][4];
    for (int j = 0; j < 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    for (int kb = 0; kb <= qb; kb++) {
        int buf = kb & 1;
        if (kb < qb) {
            fa_load_tile(ks[buf ^ 1], k, ld, (kb + 1) * 64, t);
            fa_load_tile(vs[buf ^ 1], v, ld, (kb + 1) * 64, t);
            asm volatile("cp.async.wait_group 2;" ::: "memory");
        } else {
            fa_wait_all();
        }
        __syncthreads();
        float s[8][4];
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        fa_mma_abt(s, qa, ks[buf], lane);
        bool edge = kb == qb || (kb + 1) * 64 > t;
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = kb * 64 + 8 * j + cc + (e & 1), row = e < 2 ? r0 : r1;
                float x = (!edge || (key <= row && key < t)) ? s[j][e] * scale_log2 : -INFINITY;
                s[j][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float f0 = exp2f(m0 - mx0), f1 = exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        l0 *= f0;
        l1 *= f1;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            o[j][0] *= f0;
            o[j][1] *= f0;
            o[j][2] *= f1;
            o[j][3] *= f1;
            s[j][0] = exp2f(s[j][0] - m0);
            s[j][1] = exp2f(s[j][1] - m0);
            s[j][2] = exp2f(s[j][2] - m1);
            s[j][3] = exp2f(s[j][3] - m1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }
        u32 pa[4][4];
        fa_acc_to_a(pa, s);
        fa_mma_ab(o, pa, vs[buf], lane);
        __syncthreads();  // the next iteration's loads overwrite the other buffer
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    fa_store(out + (long)bi * t * c + h * FA_HS, c, o, q0, t, 1.0f / l0, 1.0f / l1, lane);
    if ((lane & 3) == 0) {
        if (r0 < t) lse[(long)bh * t + r0] = m0 + log2f(l0);
        if (r1 < t) lse[(long)bh * t + r1] = m1 + log2f(l1);
    }
}

// D (B, NH, T) = rowsum(dout * out) per head: one warp per row.
extern "C" __global__ void flash_backward_dot(float* d, const bf16* dout, const bf16* out, int b, int t, int nh) {
    long row = blockIdx.x * (long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= (long)b * nh * t) return;
    int ti = (int)(row % t);
    long bh = row / t;
    int h = (int)(bh % nh), bi = (int)(bh / nh);
    long base = ((long)bi * t + ti) * nh * FA_HS + h * FA_HS + 2 * lane;
    float s = b2f(dout[base]) * b2f(out[base]) + b2f(dout[base + 1]) * b2f(out[base + 1]);
    s = warp_sum(s);
    if (lane == 0) d[row] = s;
}

// dK and dV: a block per 64 keys, each warp 16 of them, over the query blocks that see them.
// Query and output-gradient tiles (and their rows' lse and D) are double-buffered.
extern "C" __global__ void __launch_bounds__(128) flash_backward_kv(bf16* dqkv, const bf16* qkv, const bf16* dout,
                                                                    const float* lse, const float* dd, int t, int nh,
                                                                    float scale_log2, float scale) {
    __shared__ __align__(16) bf16 qs[2][64 * FA_STR];
    __shared__ __align__(16) bf16 os[2][64 * FA_STR];
    __shared__ float ls[2][64], ds[2][64];
    int kb = blockIdx.x, bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    int c = nh * FA_HS;
    long ld = 3L * c;
    const bf16* q = qkv + (long)bi * t * ld + h * FA_HS;
    const bf16* k = q + c;
    const bf16* v = q + 2 * c;
    const bf16* dO = dout + (long)bi * t * c + h * FA_HS;
    const float* L = lse + (long)bh * t;
    const float* D = dd + (long)bh * t;
    int lane = threadIdx.x & 31, k0 = kb * 64 + (threadIdx.x >> 5) * 16;
    int kr0 = k0 + (lane >> 2), kr1 = kr0 + 8, cc = 2 * (lane & 3);
    int nqb = (t + 63) / 64;
    fa_load_tile(qs[0], q, ld, kb * 64, t);
    fa_load_tile(os[0], dO, c, kb * 64, t);
    if (threadIdx.x < 64) {
        int r = kb * 64 + threadIdx.x;
        ls[0][threadIdx.x] = r < t ? L[r] : 0.0f;
        ds[0][threadIdx.x] = r < t ? D[r] : 0.0f;
    }
    u32 ka[4][4], va[4][4];
    fa_load_a(ka, k, ld, k0, t, lane);
    fa_load_a(va, v, ld, k0, t, lane);
    float dk[8][4], dv[8][4];
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) dk[j][e] = dv[j][e] = 0.0f;
    for (int qb = kb; qb < nqb; qb++) {
        int buf = (qb - kb) & 1;
        if (qb + 1 < nqb) {
            fa_load_tile(qs[buf ^ 1], q, ld, (qb + 1) * 64, t);
            fa_load_tile(os[buf ^ 1], dO, c, (qb + 1) * 64, t);
            if (threadIdx.x < 64) {
                int r = (qb + 1) * 64 + threadIdx.x;
                ls[buf ^ 1][threadIdx.x] = r < t ? L[r] : 0.0f;
                ds[buf ^ 1][threadIdx.x] = r < t ? D[r] : 0.0f;
            }
            asm volatile("cp.async.wait_group 2;" ::: "memory");
        } else {
            fa_wait_all();
        }
        __syncthreads();
        float s[8][4], dp[8][4];
        for (int j = 0; j < 8; j++)
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.0f;
        fa_mma_abt(s, ka, qs[buf], lane);   // S^T: keys x queries
        fa_mma_abt(dp, va, os[buf], lane);  // dP^T
        bool edge = qb == kb || (qb + 1) * 64 > t;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qi = 8 * j + cc + (e & 1), query = qb * 64 + qi, key = e < 2 ? kr0 : kr1;
                bool ok = !edge || (query >= key && query < t);
                float p = ok ? exp2f(s[j][e] * scale_log2 - ls[buf][qi]) : 0.0f;
                dp[j][e] = ok ? p * (dp[j][e] - ds[buf][qi]) * scale : 0.0f;
                s[j][e] = p;
            }
        }
        u32 pa[4][4], da[4][4];
        fa_acc_to_a(pa, s);
        fa_mma_ab(dv, pa, os[buf], lane);  // dV += P^T dO
        fa_acc_to_a(da, dp);
        fa_mma_ab(dk, da, qs[buf], lane);  // dK += dS^T Q
        __syncthreads();
    }
    bf16* dq = dqkv + (long)bi * t * ld + h * FA_HS;
    fa_store(dq + c, ld, dk, k0, t, 1.0f, 1.0f, lane);
    fa_store(dq + 2 * c, ld, dv, k0, t, 1.0f, 1.0f, lane);
}

// dQ: a block per 64 queries, each warp 16 of them, over the key blocks they see.
extern "C" __global__ void __launch_bounds__(128) flash_backward_q(bf16* dqkv, const bf16* qkv, const bf16* dout,
                                                                   const float* lse, const float* dd, int t, int nh,
                                                                   float scale_log2, float scale) {
    __shared__ __align__(16) bf16 ks[2][64 * FA_STR];
    __shared__ __align__(16) bf16 vs[2][64 * FA_STR];
    int qb = blockIdx.x, bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    int c = nh * FA_HS;
    long ld = 3L * c;
    const bf16* q = qkv + (long)bi * t * ld + h * FA_HS;
    const bf16* k = q + c;
    const bf16* v = q + 2 * c;
    const bf16* dO = dout + (long)bi * t * c + h * FA_HS;
    int lane = threadIdx.x & 31, q0 = qb * 64 + (threadIdx.x >> 5) * 16;
    int r0 = q0 + (lane >> 2), r1 = r0 + 8, cc = 2 * (lane & 3);
    fa_load_tile(ks[0], k, ld, 0, t);
    fa_load_tile(vs[0], v, ld, 0, t);
    float L0 = r0 < t ? lse[(long)bh * t + r0] : 0.0f, L1 = r1 < t ? lse[(long)bh * t + r1] : 0.0f;
    float D0 = r0 < t ? dd[(long)bh * t + r0] : 0.0f, D1 = r1 < t ? dd[(long)bh * t + r1] : 0.0f;
    u32 qa[4][4], oa[4][4];
    fa_load_a(qa, q, ld, q0, t, lane);
    fa_load_a(oa, dO, c, q0, t, lane);
    float dq[8][4];
    for (int j = 0; j < 8; j++) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;
    for (int kb = 0; kb <= qb; kb++) {
        int buf = kb & 1;
        if (kb < qb) {
            fa_load_tile(ks[buf ^ 1], k, ld, (kb + 1) * 64, t);
            fa_load_tile(vs[buf ^ 1], v, ld, (kb + 1) * 64, t);
            asm volatile("cp.async.wait_group 2;" ::: "memory");
        } else {
            fa_wait_all();
        }
        __syncthreads();
        float s[8][4], dp[8][4];
        for (int j = 0; j < 8; j++)
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.0f;
        fa_mma_abt(s, qa, ks[buf], lane);   // S
        fa_mma_abt(dp, oa, vs[buf], lane);  // dP
        bool edge = kb == qb;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = kb * 64 + 8 * j + cc + (e & 1), row = e < 2 ? r0 : r1;
                bool ok = (!edge || key <= row) && row < t;
                float p = ok ? exp2f(s[j][e] * scale_log2 - (e < 2 ? L0 : L1)) : 0.0f;
                dp[j][e] = ok ? p * (dp[j][e] - (e < 2 ? D0 : D1)) * scale : 0.0f;
            }
        }
        u32 da[4][4];
        fa_acc_to_a(da, dp);
        fa_mma_ab(dq, da, ks[buf], lane);  // dQ += dS K
        __syncthreads();
    }
    fa_store(dqkv + (long)bi * t * ld + h * FA_HS, ld, dq, q0, t, 1.0f, 1.0f, lane);
}
