//! Two checkpoints of one model side by side (`marathon ckpt diff`), from any two layouts,
//! tensor by tensor: each tensor is read whole from both, so the layouts that wrote them do not
//! matter, and compared elementwise within a [`Tolerance`] or by each family's relative L2
//! difference.
//!
//! [`Pair::open`] reads both run states and refuses checkpoints of two models; then each
//! [`Pair::compare`] of a family (`params`, `adam_m`, `adam_v`) returns its [`FamilyDiff`], so
//! a caller can show one family's figures while the next is read.

use marathon_model::{GptConfig, ParallelLayout, ParamLayout};
use marathon_storage::{Manifest, Reader};

use crate::checkpoint::{read_whole, run_state};
use crate::error::{Result, RuntimeError};

/// How close two checkpoints must be.
#[derive(Debug, Clone, Copy)]
pub enum Tolerance {
    /// Every element within `atol + rtol * |b|` (0 and 0: bitwise).
    Elementwise { atol: f64, rtol: f64 },
    /// Each family's ‖a − b‖ / ‖b‖ (over all its tensors) at most this: the measure for runs
    /// in two layouts, whose Adam updates of near-zero gradients may differ elementwise.
    L2(f64),
}

/// One checkpoint of a comparison.
#[derive(Debug, Clone)]
pub struct Side {
    /// Its root.
    pub url: String,
    pub step: u64,
    /// The layout that wrote it.
    pub layout: ParallelLayout,
}

/// One tensor of a family compared.
#[derive(Debug, Clone)]
pub struct TensorDiff {
    /// The stored name, family first (`params/wte`).
    pub name: String,
    pub elements: usize,
    /// Elements with the same bits in both.
    pub bitwise_equal: usize,
    /// The largest |a − b| over the elements that differ.
    pub max_abs: f64,
    /// The largest |a − b| / max(|a|, |b|) over the elements that differ.
    pub max_rel: f64,
    /// Every element within an elementwise tolerance (always true under [`Tolerance::L2`]).
    pub within: bool,
}

/// One family (`params`, `adam_m` or `adam_v`) compared.
#[derive(Debug, Clone)]
pub struct FamilyDiff {
    pub family: String,
    /// Its tensors in buffer order.
    pub tensors: Vec<TensorDiff>,
    /// ‖a − b‖ / ‖b‖ over all its tensors.
    pub l2: f64,
    /// `l2` within an L2 tolerance (always true under [`Tolerance::Elementwise`]).
    pub l2_within: bool,
}

impl FamilyDiff {
    /// Whether the family agrees within the tolerance it was compared under.
    pub fn agrees(&self) -> bool {
        self.l2_within && self.tensors.iter().all(|t| t.within)
    }
}

/// Two committed checkpoints of one model, opened for comparison.
#[derive(Debug)]
pub struct Pair<'r> {
    pub a: Side,
    pub b: Side,
    readers: [&'r Reader; 2],
    manifests: [Manifest; 2],
    model: GptConfig,
}

impl<'r> Pair<'r> {
    /// Opens the checkpoint of step `a.1` under `a.0` and that of step `b.1` under `b.0` (the
    /// same root may be given twice). Errors: either has no checked manifest or run state, or
    /// they are of different models ([`RuntimeError::CheckpointContent`] on `b`).
    pub fn open(a: (&'r Reader, u64), b: (&'r Reader, u64)) -> Result<Self> {
        let (ma, mb) = (a.0.manifest(a.1)?, b.0.manifest(b.1)?);
        let (sa, sb) = (
            run_state(&ma, &a.0.store.url)?,
            run_state(&mb, &b.0.store.url)?,
        );
        if sa.model != sb.model {
            return Err(RuntimeError::content(
                &b.0.store.url,
                b.1,
                format!(
                    "the checkpoints are of different models: {:?} here and {:?} in step {} \
                     under {}; diff compares one model's checkpoints",
                    sb.model, sa.model, a.1, a.0.store.url
                ),
            ));
        }
        Ok(Pair {
            a: Side {
                url: a.0.store.url.clone(),
                step: a.1,
                layout: sa.layout,
            },
            b: Side {
                url: b.0.store.url.clone(),
                step: b.1,
                layout: sb.layout,
            },
            readers: [a.0, b.0],
            manifests: [ma, mb],
            model: sa.model,
        })
    }

    /// Compares every tensor of `family` (`params`, `adam_m` or `adam_v`) under `tol`, one
    /// tensor of each checkpoint in memory at a time. Errors: a tensor cannot be read from
    /// either checkpoint ([`RuntimeError::CheckpointContent`], naming it and the step).
    pub fn compare(&self, family: &str, tol: Tolerance) -> Result<FamilyDiff> {
        let (atol, rtol) = match tol {
            Tolerance::Elementwise { atol, rtol } => (atol, rtol),
            Tolerance::L2(_) => (f64::INFINITY, 0.0),
        };
        let (mut d2, mut n2) = (0f64, 0f64);
        let mut tensors = Vec::new();
        for t in ParamLayout::new(&self.model).tensors() {
            let name = format!("{family}/{}", t.name);
            let x = read_whole(self.readers[0], &self.manifests[0], &name, &t.global_shape)?;
            let y = read_whole(self.readers[1], &self.manifests[1], &name, &t.global_shape)?;
            let (diff, d, n) = compare(name, &x, &y, atol, rtol);
            d2 += d;
            n2 += n;
            tensors.push(diff);
        }
        let l2 = d2.sqrt() / n2.sqrt().max(f64::MIN_POSITIVE);
        Ok(FamilyDiff {
            family: family.to_string(),
            tensors,
            l2,
            l2_within: match tol {
                Tolerance::L2(max) => l2 <= max,
                Tolerance::Elementwise { .. } => true,
            },
        })
    }
}

/// `x` (a) against `y` (b), each element within `atol + rtol * |b|` unless bitwise equal; with
/// the sums of (a − b)² and b² for the family's L2 difference.
fn compare(name: String, x: &[f32], y: &[f32], atol: f64, rtol: f64) -> (TensorDiff, f64, f64) {
    assert_eq!(x.len(), y.len(), "{name} read at two sizes");
    let (mut d2, mut n2) = (0f64, 0f64);
    let (mut same, mut max_abs, mut max_rel, mut within) = (0usize, 0f64, 0f64, true);
    for (&p, &q) in x.iter().zip(y) {
        d2 += (p as f64 - q as f64).powi(2);
        n2 += (q as f64).powi(2);
        if p.to_bits() == q.to_bits() {
            same += 1;
            continue;
        }
        let d = (p as f64 - q as f64).abs();
        let scale = (p.abs().max(q.abs()) as f64).max(f64::MIN_POSITIVE);
        max_abs = max_abs.max(d);
        max_rel = max_rel.max(d / scale);
        within &= d <= atol + rtol * (q as f64).abs();
    }
    let diff = TensorDiff {
        name,
        elements: x.len(),
        bitwise_equal: same,
        max_abs,
        max_rel,
        within,
    };
    (diff, d2, n2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_element_past_the_tolerance_fails_its_tensor() {
        let b = [1.0f32, -2.0, 0.5, 0.0];
        let a = [1.0f32, -2.0, 0.5 + 1e-3, 0.0];
        let (t, d2, n2) = compare("params/x".into(), &a, &b, 0.0, 0.0);
        assert_eq!((t.elements, t.bitwise_equal), (4, 3));
        assert!(!t.within, "bitwise by default");
        assert!((t.max_abs - 1e-3).abs() < 1e-6, "{}", t.max_abs);
        assert!((d2 - 1e-6).abs() < 1e-9 && (n2 - 5.25).abs() < 1e-12);
        // 1e-3 against 0.5: inside a relative 4e-3, outside 1e-3; an absolute 2e-3 covers it.
        assert!(compare("x".into(), &a, &b, 0.0, 4e-3).0.within);
        assert!(!compare("x".into(), &a, &b, 0.0, 1e-3).0.within);
        assert!(compare("x".into(), &a, &b, 2e-3, 0.0).0.within);
        // NaN is never within a tolerance, even against NaN of other bits.
        let nan = [f32::NAN];
        let other = [f32::from_bits(f32::NAN.to_bits() ^ 1)];
        assert!(!compare("x".into(), &nan, &other, 1.0, 1.0).0.within);
        assert!(compare("x".into(), &nan, &nan, 0.0, 0.0).0.within);
    }
}
