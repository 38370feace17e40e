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
// contributes zero (`kernels::embedding_forward` then `position_forward`).
extern "C" __global__ void embedding_forward(float* out, const u32* tokens, const bf16* wte, const bf16* wpe,
                                             long bt, int t, int c, int v0, int vl) {
    long n = bt * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long row = i / c;
        int col = (int)(i % c);
        int pos = (int)(row % t);
        int tok = (int)tokens[row] - v0;
        float e = (tok >= 0 && tok < vl) ? b2f(wte[(long)tok * c + col]) : 0.0f;
        out[i] = e + b2f(wpe[(long)pos * c + col]);
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

extern "C" __global__ void bias_backward(float* dbias, const bf16* dout, long rows, int oc) {
    __shared__ float sb[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    long r0 = (long)blockIdx.y * COL_ROWS;
    float ab = 0.0f;
    if (col < oc) {
        for (long r = r0 + threadIdx.y; r < rows && r < r0 + COL_ROWS; r += 8) ab += b2f(dout[r * oc + col]);
    }
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && col < oc) {
        for (int k = 1; k < 8; k++) ab += sb[k][threadIdx.x];
        atomicAdd(&dbias[col], ab);
    }
}

// ------------------------------------------------------------------------------------------
// GELU, tanh approximation

extern "C" __global__ void gelu_forward(bf16* out, const bf16* inp, long n) {
    const float s = 0.7978845608028654f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = b2f(inp[i]);
        out[i] = f2b(0.5f * v * (1.0f + tanhf(s * (v + 0.044715f * v * v * v))));
    }
}

// d = d * gelu'(inp), in place.
extern "C" __global__ void gelu_backward(bf16* d, const bf16* inp, long n) {
    const float s = 0.7978845608028654f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = b2f(inp[i]);
        float th = tanhf(s * (v + 0.044715f * v * v * v));
        float g = 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * s * (1.0f + 3.0f * 0.044715f * v * v);
        d[i] = f2b(b2f(d[i]) * g);
    }
}

// ------------------------------------------------------------------------------------------
// Attention. qkv (B, T, 3C) holds [q | k | v], head h in columns h*hs..(h+1)*hs of each part;
// the products run on (B, NH, T, hs) copies, batched over (b, h).

// q, k, v (B, NH, T, hs) from qkv (B, T, 3C).
extern "C" __global__ void attention_split(bf16* q, bf16* k, bf16* v, const bf16* qkv, int b, int t, int nh, int hs) {
    int c = nh * hs;
    long n = (long)b * t * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        // i indexes (B, NH, T, hs).
        int d = (int)(i % hs);
        long r = i / hs;
        int ti = (int)(r % t);
        r /= t;
        int h = (int)(r % nh);
        int bi = (int)(r / nh);
        long src = ((long)bi * t + ti) * 3 * c + (long)h * hs + d;
        q[i] = qkv[src];
        k[i] = qkv[src + c];
        v[i] = qkv[src + 2 * c];
    }
}

// out (B, T, C) from y (B, NH, T, hs), heads concatenated in order.
extern "C" __global__ void attention_merge(bf16* out, const bf16* y, int b, int t, int nh, int hs) {
    int c = nh * hs;
    long n = (long)b * t * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int d = (int)(i % hs);
        long r = i / hs;
        int ti = (int)(r % t);
        r /= t;
        int h = (int)(r % nh);
        int bi = (int)(r / nh);
        out[((long)bi * t + ti) * c + (long)h * hs + d] = y[i];
    }
}

// The inverse of `attention_merge`: dy (B, NH, T, hs) from dout (B, T, C).
extern "C" __global__ void attention_unmerge(bf16* dy, const bf16* dout, int b, int t, int nh, int hs) {
    int c = nh * hs;
    long n = (long)b * t * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int d = (int)(i % hs);
        long r = i / hs;
        int ti = (int)(r % t);
        r /= t;
        int h = (int)(r % nh);
        int bi = (int)(r / nh);
        dy[i] = dout[((long)bi * t + ti) * c + (long)h * hs + d];
    }
}

// The inverse of `attention_split`: dqkv (B, T, 3C) from dq, dk, dv (B, NH, T, hs).
extern "C" __global__ void attention_join(bf16* dqkv, const bf16* dq, const bf16* dk, const bf16* dv, int b, int t,
                                          int nh, int hs) {
    int c = nh * hs;
    long n = (long)b * t * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int d = (int)(i % hs);
        long r = i / hs;
        int ti = (int)(r % t);
        r /= t;
        int h = (int)(r % nh);
        int bi = (int)(r / nh);
        long dst = ((long)bi * t + ti) * 3 * c + (long)h * hs + d;
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

extern "C" __global__ void crossentropy(float* losses, bf16* logits, const u32* targets, int vl, int v0, int v,
                                        float dloss) {
    __shared__ float buf[32];
    long row = blockIdx.x;
    bf16* l = logits + row * vl;
    int real = v - v0;
    if (real > vl) real = vl;
    if (real < 0) real = 0;
    float mx = -3.402823466e38f;
    for (int j = threadIdx.x; j < real; j += blockDim.x) mx = fmaxf(mx, b2f(l[j]));
    mx = block_max(mx, buf);
    float s = 0.0f;
    for (int j = threadIdx.x; j < real; j += blockDim.x) s += __expf(b2f(l[j]) - mx);
    s = block_sum(s, buf);
    int tgt = (int)targets[row] - v0;
    if (threadIdx.x == 0) {
        float tl = b2f(l[tgt]) - mx;
        losses[row] += logf(s) - tl;
    }
    if (dloss > 0.0f) {
        __syncthreads();  // thread 0 has read the target's logit
        float inv = 1.0f / s;
        for (int j = threadIdx.x; j < vl; j += blockDim.x) {
            float g = 0.0f;
            if (j < real) g = (__expf(b2f(l[j]) - mx) * inv - (j == tgt ? 1.0f : 0.0f)) * dloss;
            l[j] = f2b(g);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Optimizer

// Sum of squares in fp64: per-block partials, then one block sums them in a fixed order.
extern "C" __global__ void sum_squares_partial(double* partials, const float* x, long n) {
    __shared__ double buf[32];
    double s = 0.0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double v = x[i];
        s += v * v;
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
