//! The scalar types the CPU kernels run in: `f32` for training, `f64` for gradient checks.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// A floating-point scalar the kernels are generic over. Only `f32` and `f64` implement it, which
/// is also what the GEMM library accepts.
pub trait Float:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;
    /// The most negative finite value: the maximum of nothing.
    const MIN: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    /// tanh for the GELU: exact in f64 (gradient checks), a rational approximation in f32 that
    /// is within 5e-7 and vectorises, where libm's tanhf is a scalar call per element.
    fn tanh_fast(self) -> Self {
        self.tanh()
    }
    /// exp for the softmaxes, whose arguments are at most 0: exact in f64 (gradient checks), a
    /// polynomial in f32 that is within 2 ulp on [-87, 88] and vectorises, where libm's expf is
    /// a scalar call per element ([`exp_f32_poly`] says what it gives outside that range).
    fn exp_fast(self) -> Self {
        self.exp()
    }
    fn sqrt(self) -> Self;
    fn max(self, other: Self) -> Self;
}

macro_rules! impl_float {
    ($t:ty, $tanh_fast:expr, $exp_fast:expr) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const MIN: Self = <$t>::MIN;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn tanh_fast(self) -> Self {
                $tanh_fast(self)
            }
            #[inline(always)]
            fn exp_fast(self) -> Self {
                $exp_fast(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}

impl_float!(f32, tanh_f32_rational, exp_f32_poly);
impl_float!(f64, f64::tanh, f64::exp);

/// Eigen's `generic_fast_tanh_float`: a 13/6 rational approximation of tanh on [-7.9, 7.9],
/// where f32 tanh is already +-1 to the last bit outside it. Its error stays below 5e-7
/// absolute (the test below), about four f32 ulp near 1.
#[inline(always)]
pub fn tanh_f32_rational(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A1: f32 = 4.893_524_6e-3;
    const A3: f32 = 6.372_619_3e-4;
    const A5: f32 = 1.485_722_4e-5;
    const A7: f32 = 5.122_297e-8;
    const A9: f32 = -8.604_672e-11;
    const A11: f32 = 2.000_188e-13;
    const A13: f32 = -2.760_768_5e-16;
    const B0: f32 = 4.893_525e-3;
    const B2: f32 = 2.268_434_7e-3;
    const B4: f32 = 1.185_347_1e-4;
    const B6: f32 = 1.198_258_4e-6;
    // Separate products and sums, not `mul_add`: without FMA in the compile target, `mul_add`
    // is a software call per operation (it must round once), which stops vectorisation.
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let mut p = x2 * A13 + A11;
    p = x2 * p + A9;
    p = x2 * p + A7;
    p = x2 * p + A5;
    p = x2 * p + A3;
    p = x2 * p + A1;
    p *= x;
    let mut q = x2 * B6 + B4;
    q = x2 * q + B2;
    q = x2 * q + B0;
    p / q
}

/// Cephes' `expf`: `exp(x) = 2^n * exp(r)` with `n = round(x / ln 2)` and `|r| <= ln 2 / 2`, a
/// degree-7 polynomial for `exp(r)`, and `2^n` built in the exponent bits. Within 2 ulp of the
/// true value on [-87, 88] (the test below); branch-free, so a loop of it vectorises. Made for
/// the softmaxes, whose arguments are at most 0: below -87 (just above where f32's normal range
/// ends, -87.34) it gives 0, above 88 infinity (though up to 88.72 the true value is finite),
/// and NaN stays NaN.
#[inline(always)]
pub fn exp_f32_poly(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for every n this range gives.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer, which then sits in the low bits.
    const ROUND: f32 = 12_582_912.0;
    // Selects, not `clamp`, so NaN passes through and the loop stays branch-free.
    let c = if x < LO { LO } else { x };
    let c = if c > HI { HI } else { c };
    let shifted = c * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let pow2 =
        f32::from_bits(((shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    let v = e * pow2;
    let v = if x < LO { 0.0 } else { v };
    if x > HI {
        f32::INFINITY
    } else {
        v
    }
}

/// The largest of `xs`, `F::MIN` when empty, in eight running maxima that vectorise: the same
/// value as a sequential `fold(F::MIN, F::max)`. NaN is passed over, as `max` passes over it;
/// a NaN logit still reaches the loss through [`exp_sum`].
#[inline]
pub fn max_of<F: Float>(xs: &[F]) -> F {
    let mut acc = [F::MIN; 8];
    let mut chunks = xs.chunks_exact(8);
    for ch in &mut chunks {
        for i in 0..8 {
            acc[i] = if ch[i] > acc[i] { ch[i] } else { acc[i] };
        }
    }
    let mut m = chunks.remainder().iter().copied().fold(F::MIN, F::max);
    for a in acc {
        m = m.max(a);
    }
    m
}

/// Replaces each `x` with `exp(x - max)` and returns their sum, added in eight running partial
/// sums and then in a fixed order, so the result is the same whatever the thread count. The
/// exponentials and the sums are separate loops over blocks that stay in L1, so both vectorise.
#[inline]
pub fn exp_sum<F: Float>(xs: &mut [F], max: F) -> F {
    const BLOCK: usize = 512;
    let mut acc = [F::ZERO; 8];
    let mut s = F::ZERO;
    for block in xs.chunks_mut(BLOCK) {
        for x in block.iter_mut() {
            *x = (*x - max).exp_fast();
        }
        let mut chunks = block.chunks_exact(8);
        for ch in &mut chunks {
            for i in 0..8 {
                acc[i] += ch[i];
            }
        }
        for &x in chunks.remainder() {
            s += x;
        }
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rational_tanh_is_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (tanh_f32_rational(x) as f64, (x as f64).tanh());
            worst = worst.max((got - want).abs());
        }
        assert!(worst < 5e-7, "max abs error {worst}");
    }

    #[test]
    fn polynomial_exp_is_within_two_ulp_and_keeps_the_edges() {
        let mut worst_ulp = 0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp_f32_poly(x) as f64, (x as f64).exp());
            let ulp = (want as f32).to_bits().abs_diff((got as f32).to_bits()) as f64;
            worst_ulp = worst_ulp.max(ulp);
        }
        assert!(worst_ulp <= 2.0, "max error {worst_ulp} ulp");
        assert_eq!(exp_f32_poly(0.0), 1.0);
        assert_eq!(exp_f32_poly(-100.0), 0.0);
        assert_eq!(exp_f32_poly(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32_poly(100.0), f32::INFINITY);
        assert!(exp_f32_poly(f32::NAN).is_nan());
    }

    #[test]
    fn vector_max_and_exp_sum_agree_with_sequential_ones() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
            .collect();
        let max = max_of(&xs);
        assert_eq!(max, xs.iter().copied().fold(f32::MIN, f32::max));
        let mut ys = xs.clone();
        let sum = exp_sum(&mut ys, max) as f64;
        let want: f64 = xs.iter().map(|&x| ((x - max) as f64).exp()).sum();
        assert!((sum - want).abs() / want < 1e-6, "{sum} against {want}");
        for (y, x) in ys.iter().zip(&xs) {
            assert!((*y as f64 - ((x - max) as f64).exp()).abs() < 1e-6);
        }
        assert_eq!(max_of::<f32>(&[]), f32::MIN);
    }
}
