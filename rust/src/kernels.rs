//! Weighted aggregation of flat vectors: `out = sum_i w_i * x_i`, accumulated in f32.
//!
//! The output is processed in blocks of [`BLOCK`] elements. For each block the
//! clients are visited in groups of [`GROUP`]: a group's inputs are converted to f32
//! (a no-op view for f32 inputs) and added into the block while it sits in L1, so each
//! output block is read and written once per group instead of once per client.
//!
//! Every output element is summed in the same order -- client 0, 1, 2, ... -- no
//! matter how the range is split between threads, so results are bitwise identical
//! for any thread count.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Output elements per cache block (16 KiB of f32).
pub const BLOCK: usize = 4096;
/// Clients accumulated per pass over an output block.
pub const GROUP: usize = 8;
/// Below this many elements per thread, extra threads cost more than they save.
const MIN_PER_THREAD: usize = 1 << 16;

/// One input vector.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Input<'_> {
    pub fn len(&self) -> usize {
        match self {
            Input::F32(x) => x.len(),
            Input::F16(x) => x.len(),
            Input::BF16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens `x[start..end]` into `slot` unless it is already f32 (then it is read in place).
    fn widen_into(&self, start: usize, end: usize, slot: &mut [f32]) {
        match self {
            Input::F32(_) => {}
            Input::F16(x) => x[start..end].convert_to_f32_slice(&mut slot[..end - start]),
            Input::BF16(x) => x[start..end].convert_to_f32_slice(&mut slot[..end - start]),
        }
    }

    /// `x[start..end]` as f32: the input itself for f32, else what `widen_into` wrote.
    fn f32_view<'s>(&'s self, start: usize, end: usize, slot: &'s [f32]) -> &'s [f32] {
        match self {
            Input::F32(x) => &x[start..end],
            _ => &slot[..end - start],
        }
    }

    /// True when any element is NaN or +-Inf (exponent bits all ones).
    pub fn has_nonfinite(&self) -> bool {
        match self {
            Input::F32(x) => x.iter().any(|v| v.to_bits() & 0x7f80_0000 == 0x7f80_0000),
            Input::F16(x) => x.iter().any(|v| v.to_bits() & 0x7c00 == 0x7c00),
            Input::BF16(x) => x.iter().any(|v| v.to_bits() & 0x7f80 == 0x7f80),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum KernelError {
    Empty,
    LengthMismatch {
        index: usize,
        len: usize,
        expected: usize,
    },
    WeightCount {
        weights: usize,
        inputs: usize,
    },
    BadWeight {
        index: usize,
        value: f64,
    },
    ZeroWeights,
    OutputSize {
        len: usize,
        expected: usize,
    },
    NonFinite {
        inputs: Vec<usize>,
    },
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::Empty => write!(f, "no inputs to aggregate"),
            KernelError::LengthMismatch {
                index,
                len,
                expected,
            } => write!(
                f,
                "inputs[{index}] has {len} elements but inputs[0] has {expected}"
            ),
            KernelError::WeightCount { weights, inputs } => {
                write!(f, "{weights} weights given for {inputs} inputs")
            }
            KernelError::BadWeight { index, value } => write!(
                f,
                "weights[{index}] = {value}: weights must be finite and non-negative"
            ),
            KernelError::ZeroWeights => write!(f, "all weights are zero: the mean is undefined"),
            KernelError::OutputSize { len, expected } => {
                write!(f, "out has {len} elements but the inputs have {expected}")
            }
            KernelError::NonFinite { inputs } if inputs.is_empty() => write!(
                f,
                "the result holds NaN or Inf although every input is finite (float32 overflow)"
            ),
            KernelError::NonFinite { inputs } => {
                write!(f, "inputs {inputs:?} hold NaN or Inf values")
            }
        }
    }
}

impl std::error::Error for KernelError {}

fn check_inputs(inputs: &[Input<'_>]) -> Result<usize, KernelError> {
    let first = inputs.first().ok_or(KernelError::Empty)?;
    let expected = first.len();
    for (index, x) in inputs.iter().enumerate() {
        if x.len() != expected {
            return Err(KernelError::LengthMismatch {
                index,
                len: x.len(),
                expected,
            });
        }
    }
    Ok(expected)
}

/// Validates weights and turns them into the f32 factors actually applied. For the
/// mean they are normalised in f64 first, so `sum_i w_i` need not fit f32 precisely.
pub fn factors(weights: &[f64], n_inputs: usize, normalize: bool) -> Result<Vec<f32>, KernelError> {
    if weights.len() != n_inputs {
        return Err(KernelError::WeightCount {
            weights: weights.len(),
            inputs: n_inputs,
        });
    }
    for (index, &w) in weights.iter().enumerate() {
        if !w.is_finite() || (normalize && w < 0.0) {
            return Err(KernelError::BadWeight { index, value: w });
        }
    }
    if !normalize {
        return Ok(weights.iter().map(|&w| w as f32).collect());
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(KernelError::ZeroWeights);
    }
    Ok(weights.iter().map(|&w| (w / total) as f32).collect())
}

/// Adds `sum_k w[k] * xs[k][j]` into `acc[j]`, clients in order. `G` is a constant so
/// the inner loop over clients unrolls and the loop over `j` vectorises.
#[inline(always)]
fn add_group<const G: usize>(acc: &mut [f32], xs: &[&[f32]], w: &[f32]) {
    let n = acc.len();
    let xs: [&[f32]; G] = std::array::from_fn(|k| &xs[k][..n]);
    let w: [f32; G] = std::array::from_fn(|k| w[k]);
    for j in 0..n {
        let mut a = acc[j];
        for k in 0..G {
            a += w[k] * xs[k][j];
        }
        acc[j] = a;
    }
}

#[inline(always)]
fn add_any(acc: &mut [f32], xs: &[&[f32]], w: &[f32]) {
    match xs.len() {
        8 => add_group::<8>(acc, xs, w),
        7 => add_group::<7>(acc, xs, w),
        6 => add_group::<6>(acc, xs, w),
        5 => add_group::<5>(acc, xs, w),
        4 => add_group::<4>(acc, xs, w),
        3 => add_group::<3>(acc, xs, w),
        2 => add_group::<2>(acc, xs, w),
        1 => add_group::<1>(acc, xs, w),
        _ => unreachable!("groups hold 1..=GROUP inputs"),
    }
}

/// `out[start..start+len]` (given as `out`) += or = the weighted sum, block by block.
///
/// On x86-64 CPUs with AVX2 the same code is compiled a second time with 8-wide
/// vectors. Each element still gets the same multiplies and adds in the same order
/// (no fused multiply-add), so both versions give bitwise identical results.
fn sum_range(inputs: &[Input<'_>], w: &[f32], out: &mut [f32], offset: usize, zero_first: bool) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the running CPU supports AVX2.
        return unsafe { sum_range_avx2(inputs, w, out, offset, zero_first) };
    }
    sum_range_portable(inputs, w, out, offset, zero_first)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_range_avx2(
    inputs: &[Input<'_>],
    w: &[f32],
    out: &mut [f32],
    offset: usize,
    zero_first: bool,
) {
    sum_range_portable(inputs, w, out, offset, zero_first)
}

#[inline(always)]
fn sum_range_portable(
    inputs: &[Input<'_>],
    w: &[f32],
    out: &mut [f32],
    offset: usize,
    zero_first: bool,
) {
    let mut scratch = vec![0f32; GROUP * BLOCK];
    let mut b = 0;
    while b < out.len() {
        let e = (b + BLOCK).min(out.len());
        let acc = &mut out[b..e];
        if zero_first {
            acc.fill(0.0);
        }
        for (g, group) in inputs.chunks(GROUP).enumerate() {
            for (x, slot) in group.iter().zip(scratch.chunks_mut(BLOCK)) {
                x.widen_into(offset + b, offset + e, slot);
            }
            let mut xs: [&[f32]; GROUP] = [&[]; GROUP];
            for ((x, slot), view) in group.iter().zip(scratch.chunks(BLOCK)).zip(xs.iter_mut()) {
                *view = x.f32_view(offset + b, offset + e, slot);
            }
            add_any(
                acc,
                &xs[..group.len()],
                &w[g * GROUP..g * GROUP + group.len()],
            );
        }
        b = e;
    }
}

/// Splits `out` into at most `threads` contiguous, block-aligned chunks and runs
/// `f(chunk, offset)` on each in its own thread.
fn parallel_chunks<F>(out: &mut [f32], threads: usize, f: F)
where
    F: Fn(&mut [f32], usize) + Sync,
{
    let by_size = out.len().div_ceil(MIN_PER_THREAD).max(1);
    let threads = threads.clamp(1, by_size);
    if threads == 1 {
        f(out, 0);
        return;
    }
    let per = out.len().div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    std::thread::scope(|s| {
        let f = &f;
        for (i, chunk) in out.chunks_mut(per).enumerate() {
            s.spawn(move || f(chunk, i * per));
        }
    });
}

/// Indices of inputs holding NaN or Inf.
pub fn find_nonfinite(inputs: &[Input<'_>], threads: usize) -> Vec<usize> {
    let threads = threads.max(1);
    if threads == 1 || inputs.len() == 1 {
        return (0..inputs.len())
            .filter(|&i| inputs[i].has_nonfinite())
            .collect();
    }
    let mut flags = vec![false; inputs.len()];
    let per = inputs.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (c, chunk) in flags.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (k, flag) in chunk.iter_mut().enumerate() {
                    *flag = inputs[c * per + k].has_nonfinite();
                }
            });
        }
    });
    flags
        .iter()
        .enumerate()
        .filter(|(_, f)| **f)
        .map(|(i, _)| i)
        .collect()
}

fn result_is_finite(out: &[f32]) -> bool {
    out.iter().all(|v| v.to_bits() & 0x7f80_0000 != 0x7f80_0000)
}

/// `out = sum_i f_i * inputs[i]` where `f` comes from [`factors`].
pub fn weighted_sum(
    inputs: &[Input<'_>],
    weights: &[f64],
    normalize: bool,
    out: &mut [f32],
    threads: usize,
    check_finite: bool,
) -> Result<(), KernelError> {
    let len = check_inputs(inputs)?;
    if out.len() != len {
        return Err(KernelError::OutputSize {
            len: out.len(),
            expected: len,
        });
    }
    let w = factors(weights, inputs.len(), normalize)?;
    parallel_chunks(out, threads, |chunk, offset| {
        sum_range(inputs, &w, chunk, offset, true)
    });
    if check_finite && !result_is_finite(out) {
        return Err(KernelError::NonFinite {
            inputs: find_nonfinite(inputs, threads),
        });
    }
    Ok(())
}

/// `acc += weight * x`.
pub fn accumulate(
    acc: &mut [f32],
    x: Input<'_>,
    weight: f64,
    threads: usize,
) -> Result<(), KernelError> {
    if acc.len() != x.len() {
        return Err(KernelError::OutputSize {
            len: acc.len(),
            expected: x.len(),
        });
    }
    if !weight.is_finite() {
        return Err(KernelError::BadWeight {
            index: 0,
            value: weight,
        });
    }
    let w = [weight as f32];
    let inputs = [x];
    parallel_chunks(acc, threads, |chunk, offset| {
        sum_range(&inputs, &w, chunk, offset, false)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_f64_reference_for_odd_sizes() {
        for (n_inputs, len) in [(1, 1), (3, 5000), (9, 4097), (17, 70_001), (8, 8192)] {
            let xs: Vec<Vec<f32>> = (0..n_inputs).map(|i| values(i as u64, len)).collect();
            let weights: Vec<f64> = (0..n_inputs).map(|i| 1.0 + i as f64).collect();
            let inputs: Vec<Input> = xs.iter().map(|x| Input::F32(x)).collect();
            let mut out = vec![0f32; len];
            weighted_sum(&inputs, &weights, true, &mut out, 1, true).unwrap();
            let total: f64 = weights.iter().sum();
            for j in (0..len).step_by(131) {
                let r: f64 = (0..n_inputs)
                    .map(|i| weights[i] * xs[i][j] as f64)
                    .sum::<f64>()
                    / total;
                assert!(
                    (out[j] as f64 - r).abs() < 1e-5,
                    "n={n_inputs} len={len} j={j}"
                );
            }
        }
    }

    #[test]
    fn bitwise_identical_across_thread_counts() {
        let len = 300_001;
        let xs: Vec<Vec<f32>> = (0..13).map(|i| values(100 + i, len)).collect();
        let inputs: Vec<Input> = xs.iter().map(|x| Input::F32(x)).collect();
        let weights: Vec<f64> = (0..13).map(|i| 0.3 + i as f64 * 0.71).collect();
        let mut one = vec![0f32; len];
        weighted_sum(&inputs, &weights, true, &mut one, 1, true).unwrap();
        for threads in [2, 3, 4, 7] {
            let mut many = vec![0f32; len];
            weighted_sum(&inputs, &weights, true, &mut many, threads, true).unwrap();
            assert!(
                one.iter()
                    .zip(&many)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "threads={threads}"
            );
        }
    }

    #[test]
    fn vector_widths_agree_bitwise() {
        let len = 10_000;
        let xs: Vec<Vec<f32>> = (0..11).map(|i| values(300 + i, len)).collect();
        let inputs: Vec<Input> = xs.iter().map(|x| Input::F32(x)).collect();
        let w: Vec<f32> = (0..11).map(|i| 0.37 + i as f32 * 0.11).collect();
        let mut portable = vec![0f32; len];
        sum_range_portable(&inputs, &w, &mut portable, 0, true);
        let mut dispatched = vec![0f32; len];
        sum_range(&inputs, &w, &mut dispatched, 0, true);
        assert!(portable
            .iter()
            .zip(&dispatched)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn half_inputs_are_widened() {
        let x: Vec<f32> = values(7, 5000);
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut out_h = vec![0f32; x.len()];
        let mut out_b = vec![0f32; x.len()];
        weighted_sum(
            &[Input::F16(&h), Input::F16(&h)],
            &[1.0, 1.0],
            false,
            &mut out_h,
            2,
            true,
        )
        .unwrap();
        weighted_sum(
            &[Input::BF16(&b), Input::BF16(&b)],
            &[1.0, 1.0],
            false,
            &mut out_b,
            2,
            true,
        )
        .unwrap();
        for j in 0..x.len() {
            assert_eq!(out_h[j], 2.0 * h[j].to_f32());
            assert_eq!(out_b[j], 2.0 * b[j].to_f32());
        }
    }

    #[test]
    fn accumulate_streams_like_weighted_sum() {
        let xs: Vec<Vec<f32>> = (0..5).map(|i| values(i, 10_000)).collect();
        let w = [0.5, 1.5, 2.0, 0.25, 1.0];
        let mut acc = vec![0f32; 10_000];
        for (x, &wi) in xs.iter().zip(&w) {
            accumulate(&mut acc, Input::F32(x), wi, 2).unwrap();
        }
        let inputs: Vec<Input> = xs.iter().map(|x| Input::F32(x)).collect();
        let mut out = vec![0f32; 10_000];
        weighted_sum(&inputs, &w, false, &mut out, 1, true).unwrap();
        // The same per-element order (acc starts at 0, clients in order) gives the same bits.
        assert!(acc
            .iter()
            .zip(&out)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn errors() {
        let a = vec![1f32; 4];
        let b = vec![1f32; 5];
        let mut out = vec![0f32; 4];
        assert_eq!(
            weighted_sum(&[], &[], true, &mut out, 1, true),
            Err(KernelError::Empty)
        );
        assert!(matches!(
            weighted_sum(
                &[Input::F32(&a), Input::F32(&b)],
                &[1.0, 1.0],
                true,
                &mut out,
                1,
                true
            ),
            Err(KernelError::LengthMismatch { index: 1, .. })
        ));
        assert!(matches!(
            weighted_sum(&[Input::F32(&a)], &[-1.0], true, &mut out, 1, true),
            Err(KernelError::BadWeight { index: 0, .. })
        ));
        assert!(matches!(
            weighted_sum(&[Input::F32(&a)], &[f64::NAN], false, &mut out, 1, true),
            Err(KernelError::BadWeight { .. })
        ));
        assert_eq!(
            weighted_sum(&[Input::F32(&a)], &[0.0], true, &mut out, 1, true),
            Err(KernelError::ZeroWeights)
        );
        assert!(matches!(
            weighted_sum(&[Input::F32(&a)], &[1.0, 2.0], true, &mut out, 1, true),
            Err(KernelError::WeightCount { .. })
        ));
        let mut small = vec![0f32; 3];
        assert!(matches!(
            weighted_sum(&[Input::F32(&a)], &[1.0], true, &mut small, 1, true),
            Err(KernelError::OutputSize { .. })
        ));
        let mut bad = a.clone();
        bad[2] = f32::NAN;
        assert_eq!(
            weighted_sum(
                &[Input::F32(&a), Input::F32(&bad)],
                &[1.0, 1.0],
                true,
                &mut out,
                1,
                true
            ),
            Err(KernelError::NonFinite { inputs: vec![1] })
        );
        // With the check off the NaN propagates and no error is raised.
        weighted_sum(
            &[Input::F32(&a), Input::F32(&bad)],
            &[1.0, 1.0],
            true,
            &mut out,
            1,
            false,
        )
        .unwrap();
        assert!(out[2].is_nan());
        let big = vec![f32::MAX; 4];
        assert_eq!(
            weighted_sum(
                &[Input::F32(&big), Input::F32(&big)],
                &[1.0, 1.0],
                false,
                &mut out,
                1,
                true
            ),
            Err(KernelError::NonFinite { inputs: vec![] })
        );
        let h = vec![f16::INFINITY; 3];
        let bb = vec![bf16::NAN; 3];
        assert!(Input::F16(&h).has_nonfinite());
        assert!(Input::BF16(&bb).has_nonfinite());
        assert_eq!(
            find_nonfinite(&[Input::F32(&a), Input::F32(&bad), Input::F32(&a)], 2),
            vec![1]
        );
    }
}
