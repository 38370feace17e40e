//! The collectives tensor parallelism needs, as a trait the runtime implements.
//!
//! The model calls these at the points Megatron does: the sum of a row-parallel layer's partial
//! outputs in forward, the sum of a column-parallel layer's partial input gradients in backward,
//! the vocabulary-parallel embedding's sum, and the statistics of the vocabulary-parallel
//! cross-entropy. The model never knows what carries them (TCP on the CPU, NCCL on GPUs).

use std::convert::Infallible;

/// A tensor-parallel group seen from one member. Every member calls the same operations in the
/// same order with buffers of the same length.
pub trait Collective<F> {
    type Error;

    /// Members of the group.
    fn size(&self) -> usize;

    /// This member's place in the group, `0..size`.
    fn rank(&self) -> usize;

    /// Replaces `buf` on every member with the element-wise sum over members. Every member ends
    /// with bitwise the same values.
    fn all_reduce(&mut self, buf: &mut [F]) -> Result<(), Self::Error>;

    /// `buf` holds `size` equal parts; member `i` fills part `i`, and afterwards every member
    /// holds every part.
    fn all_gather(&mut self, buf: &mut [F]) -> Result<(), Self::Error>;
}

/// The group of one: every operation is the identity. A model that is not split by tensor
/// parallelism runs with it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl<F> Collective<F> for Solo {
    type Error = Infallible;

    fn size(&self) -> usize {
        1
    }

    fn rank(&self) -> usize {
        0
    }

    fn all_reduce(&mut self, _buf: &mut [F]) -> Result<(), Infallible> {
        Ok(())
    }

    fn all_gather(&mut self, _buf: &mut [F]) -> Result<(), Infallible> {
        Ok(())
    }
}
