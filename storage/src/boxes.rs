//! Boxes of N-dimensional tensors: a box is an offset and a size per dimension, and its elements
//! are stored in row-major order of the box itself. Every stored piece of a checkpoint is a box
//! of a logical tensor, so any layout can read any other's pieces by intersecting boxes.

use serde::{Deserialize, Serialize};

/// A box of a tensor: `offset[d]..offset[d] + size[d]` in each dimension `d`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorBox {
    pub offset: Vec<u64>,
    pub size: Vec<u64>,
}

impl TensorBox {
    /// The whole of a tensor of `shape`.
    pub fn whole(shape: &[u64]) -> Self {
        TensorBox {
            offset: vec![0; shape.len()],
            size: shape.to_vec(),
        }
    }

    pub fn numel(&self) -> u64 {
        self.size.iter().product()
    }

    /// Whether the box lies inside a tensor of `shape`.
    pub fn fits(&self, shape: &[u64]) -> bool {
        self.offset.len() == shape.len()
            && self.size.len() == shape.len()
            && (0..shape.len()).all(|d| self.offset[d] + self.size[d] <= shape[d])
    }

    /// The common part of two boxes, if any.
    pub fn intersect(&self, other: &TensorBox) -> Option<TensorBox> {
        assert_eq!(
            self.offset.len(),
            other.offset.len(),
            "boxes of different rank"
        );
        let mut out = TensorBox {
            offset: Vec::with_capacity(self.offset.len()),
            size: Vec::with_capacity(self.offset.len()),
        };
        for d in 0..self.offset.len() {
            let lo = self.offset[d].max(other.offset[d]);
            let hi = (self.offset[d] + self.size[d]).min(other.offset[d] + other.size[d]);
            if lo >= hi {
                return None;
            }
            out.offset.push(lo);
            out.size.push(hi - lo);
        }
        Some(out)
    }

    /// This box shifted by `by` in every dimension.
    pub fn shifted(&self, by: &[u64]) -> TensorBox {
        TensorBox {
            offset: self.offset.iter().zip(by).map(|(a, b)| a + b).collect(),
            size: self.size.clone(),
        }
    }
}

/// Splits the flat row-major range `start..end` of a tensor of `shape` into boxes, in order:
/// each box's elements are one contiguous run of the range. At most two boxes per dimension.
pub fn range_to_boxes(shape: &[u64], start: u64, end: u64) -> Vec<TensorBox> {
    let mut out = Vec::new();
    split_range(shape, start, end, &mut Vec::new(), &mut out);
    out
}

fn split_range(
    shape: &[u64],
    start: u64,
    end: u64,
    prefix: &mut Vec<u64>,
    out: &mut Vec<TensorBox>,
) {
    if start >= end {
        return;
    }
    let push = |prefix: &Vec<u64>, lead: (u64, u64), rest: &[u64], out: &mut Vec<TensorBox>| {
        let mut offset: Vec<u64> = prefix.clone();
        let mut size = vec![1; prefix.len()];
        offset.push(lead.0);
        size.push(lead.1);
        offset.extend(std::iter::repeat_n(0, rest.len()));
        size.extend_from_slice(rest);
        out.push(TensorBox { offset, size });
    };
    if shape.len() == 1 {
        push(prefix, (start, end - start), &[], out);
        return;
    }
    let inner: u64 = shape[1..].iter().product();
    let (mut first, last) = (start / inner, end / inner);
    if start % inner != 0 {
        // A partial leading row.
        let row_end = (first + 1) * inner;
        prefix.push(first);
        split_range(
            &shape[1..],
            start % inner,
            end.min(row_end) - first * inner,
            prefix,
            out,
        );
        prefix.pop();
        first += 1;
        if end <= row_end {
            return;
        }
    }
    if last > first {
        push(prefix, (first, last - first), &shape[1..], out);
    }
    if end % inner != 0 && last >= first {
        prefix.push(last);
        split_range(&shape[1..], 0, end % inner, prefix, out);
        prefix.pop();
    }
}

/// Copies the elements of `src` (the box `src_box`, row-major) that also lie in `dst_box` into
/// `dst` (the box `dst_box`, row-major). Returns how many elements were copied.
///
/// # Panics
/// If a buffer's length is not its box's element count or the boxes differ in rank.
pub fn copy_intersection<T: Copy>(
    src: &[T],
    src_box: &TensorBox,
    dst: &mut [T],
    dst_box: &TensorBox,
) -> u64 {
    assert_eq!(src.len() as u64, src_box.numel(), "source is not its box");
    assert_eq!(
        dst.len() as u64,
        dst_box.numel(),
        "destination is not its box"
    );
    let Some(common) = src_box.intersect(dst_box) else {
        return 0;
    };
    let dims = common.size.len();
    let row = common.size[dims - 1] as usize;
    let rows: u64 = common.size[..dims - 1].iter().product();
    // Row-major strides of each box.
    let strides = |b: &TensorBox| {
        let mut s = vec![1u64; dims];
        for d in (0..dims - 1).rev() {
            s[d] = s[d + 1] * b.size[d + 1];
        }
        s
    };
    let (ss, ds) = (strides(src_box), strides(dst_box));
    let mut idx = vec![0u64; dims];
    for r in 0..rows {
        // The row's position in the common box, then in each buffer.
        let mut rest = r;
        for d in (0..dims - 1).rev() {
            idx[d] = rest % common.size[d];
            rest /= common.size[d];
        }
        idx[dims - 1] = 0;
        let (mut so, mut dof) = (0u64, 0u64);
        for d in 0..dims {
            let g = common.offset[d] + idx[d];
            so += (g - src_box.offset[d]) * ss[d];
            dof += (g - dst_box.offset[d]) * ds[d];
        }
        let (so, dof) = (so as usize, dof as usize);
        dst[dof..dof + row].copy_from_slice(&src[so..so + row]);
    }
    common.numel()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flat range of a few shapes splits into boxes that cover exactly that range, in
    /// order.
    #[test]
    fn ranges_split_into_contiguous_boxes() {
        for shape in [vec![7u64], vec![3, 5], vec![3, 4, 5], vec![2, 1, 3, 2]] {
            let n: u64 = shape.iter().product();
            let ids: Vec<u64> = (0..n).collect();
            for start in 0..=n {
                for end in start..=n {
                    let boxes = range_to_boxes(&shape, start, end);
                    let mut got = Vec::new();
                    for b in &boxes {
                        assert!(b.fits(&shape), "{b:?} outside {shape:?}");
                        let mut part = vec![0u64; b.numel() as usize];
                        copy_intersection(&ids, &TensorBox::whole(&shape), &mut part, b);
                        got.extend(part);
                    }
                    assert_eq!(
                        got,
                        (start..end).collect::<Vec<_>>(),
                        "{shape:?} {start}..{end}"
                    );
                    assert!(boxes.len() <= 2 * shape.len());
                }
            }
        }
    }

    #[test]
    fn intersections_copy_between_any_two_boxes() {
        let shape = [4u64, 6];
        let whole: Vec<u32> = (0..24).collect();
        let a = TensorBox {
            offset: vec![1, 2],
            size: vec![3, 3],
        };
        let mut pa = vec![0u32; 9];
        assert_eq!(
            copy_intersection(&whole, &TensorBox::whole(&shape), &mut pa, &a),
            9
        );
        assert_eq!(pa, [8, 9, 10, 14, 15, 16, 20, 21, 22]);
        let b = TensorBox {
            offset: vec![0, 3],
            size: vec![2, 3],
        };
        let mut pb = vec![0u32; 6];
        assert_eq!(copy_intersection(&pa, &a, &mut pb, &b), 2);
        assert_eq!(pb, [0, 0, 0, 9, 10, 0]);
        let far = TensorBox {
            offset: vec![0, 0],
            size: vec![1, 1],
        };
        assert_eq!(copy_intersection(&pa, &a, &mut [0u32], &far), 0);
    }
}
