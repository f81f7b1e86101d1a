//! Exact, order-independent weighted sums: `sum_i w_i * x_i` on a fixed binary grid in
//! 128-bit integers.
//!
//! Floating-point addition is not associative, so a float sum depends on the order and
//! grouping of its terms. Integer addition is, so this module turns every term into an
//! integer once and adds integers: an [`ExactSum`] can be split anywhere (by elements,
//! by clients, across processes) and combined in any order with the same bits.
//!
//! **Terms.** Each term is formed once, deterministically: the input (f32, f16 or
//! bf16, all exact in f64) is multiplied by the weight in f64 -- one IEEE multiply,
//! one rounding -- and the product is rounded to the nearest multiple of the grid
//! quantum `2^-grid` (ties to even). The result is an integer count of quanta, added
//! into one `i128` per element.
//!
//! **Weights** must be finite, `|w| < 2^39` (5.5e11) and multiples of `2^-64`; every
//! f64 in `[2^-12, 2^39)` is one, so are sample counts and fractions such as 0.1 or
//! 1/3 as f64. Their total is kept exactly, as an `i128` count of `2^-64`.
//!
//! **Grid and range.** `grid` (default [`DEFAULT_GRID`] = 64) is the number of
//! fractional bits. A term must satisfy `|w * x| < 2^(103 - grid)` (5.5e11 at the
//! default grid), so its integer is below `2^103` ([`TERM_BITS`]); at most
//! `2^24` ([`MAX_ADDS`]) vectors may go into one sum, merges included. Hence every
//! partial sum stays below `2^24 * 2^103 = 2^127`: the `i128` can never wrap, whatever
//! the order, and an out-of-range term or a 2^24+1-th vector is a typed error
//! (detected before anything is added, so a refused vector leaves the sum unchanged),
//! as are NaN and Inf inputs.
//!
//! **Error bound.** Against the exact real `S = sum_i w_i x_i`, the accumulated value
//! `A` satisfies `|A - S| <= sum_i (2^-53 |w_i x_i| + 2^-(grid+1))` (the f64 product,
//! then the grid). [`ExactSum::finish_sum`] returns `A` and [`ExactSum::finish`] returns
//! `A / W` (`W` the exact total weight), each rounded *once* to the nearest f32. So the
//! results carry one f32 rounding plus the terms' error above. Today's f32 accumulation
//! rounds the weight factor (`2^-24` relative) and every partial sum (`2^-24` of the
//! running sum each), `n` roundings in all. At the default grid the `2^-65` absolute
//! per term is below one f32 rounding of the sum whenever `|S| >= n * 2^-40`
//! (`n * 9.1e-13`); with weights >= 1 that is any mean of magnitude >= 9.1e-13. Only
//! parameters whose weighted mean is smaller than that -- far below anything a model's
//! output can feel -- are held to `2^-65` absolute instead of f32's relative
//! precision; a finer `grid` moves that line at the cost of range (each bit of grid
//! halves the term limit).
//!
//! **Threads.** Elements are independent, so the vector is split into contiguous chunks,
//! one per thread; the bits do not depend on the thread count.
//!
//! **Bytes.** [`ExactSum::to_bytes`] writes, little-endian: the 8-byte magic
//! `EMBFLXS\0`, `u32` version (1), `u32` grid, `u64` length, `u64` count of vectors
//! added, `i128` total weight in units of `2^-64`, then `length` `i128` sums in units
//! of `2^-grid`. [`ExactSum::from_bytes`] checks every field, the size, and that every
//! value respects the bound its count implies (so a corrupt file cannot make a later
//! add wrap).

mod add;
mod error;
mod finish;
mod format;

pub use error::{ExactError, FormatError};
pub use finish::round_ratio;

/// Fractional bits of the grid unless chosen otherwise.
pub const DEFAULT_GRID: u32 = 64;
/// The largest grid accepted (term limit `2^3`).
pub const MAX_GRID: u32 = 100;
/// Every term's integer is below `2^TERM_BITS` in magnitude.
pub const TERM_BITS: u32 = 103;
/// Vectors one sum may hold, merges included: `MAX_ADDS * 2^TERM_BITS <= 2^127`.
pub const MAX_ADDS: u64 = 1 << 24;
/// Weights are counted in units of `2^-WEIGHT_GRID`.
pub const WEIGHT_GRID: u32 = 64;
/// Byte-format magic and version.
pub const MAGIC: [u8; 8] = *b"EMBFLXS\0";
pub const VERSION: u32 = 1;
/// Header bytes before the sums.
pub const HEADER_LEN: usize = 48;

/// Elements per block: the f16/bf16 widening scratch (16 KiB) stays in L1.
const BLOCK: usize = 4096;
/// Below this many elements per thread, extra threads cost more than they save.
const MIN_PER_THREAD: usize = 1 << 16;

/// `2^e` as f64 for `-1022 <= e <= 1023`.
const fn pow2(e: i32) -> f64 {
    f64::from_bits(((1023 + e) as u64) << 52)
}

const TERM_LIMIT: f64 = pow2(TERM_BITS as i32);
const WEIGHT_LIMIT: f64 = pow2(TERM_BITS as i32 - WEIGHT_GRID as i32);

/// Runs `f(chunk, offset)` on contiguous chunks of `data`, one thread each, and returns
/// the results in chunk order.
fn par_chunks<T: Send, R: Send>(
    data: &mut [T],
    threads: usize,
    f: impl Fn(&mut [T], usize) -> R + Sync,
) -> Vec<R> {
    let threads = threads.clamp(1, data.len().div_ceil(MIN_PER_THREAD).max(1));
    if threads == 1 {
        return vec![f(data, 0)];
    }
    let per = data.len().div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = data
            .chunks_mut(per)
            .enumerate()
            .map(|(i, chunk)| s.spawn(move || f(chunk, i * per)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("exact-sum worker panicked"))
            .collect()
    })
}

/// An exact weighted sum of vectors (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExactSum {
    grid: u32,
    count: u64,
    /// Total weight in units of `2^-WEIGHT_GRID`.
    weight: i128,
    /// Sums in units of `2^-grid`.
    acc: Vec<i128>,
}

impl ExactSum {
    pub fn new(len: usize, grid: u32) -> Result<Self, ExactError> {
        if grid > MAX_GRID {
            return Err(ExactError::BadGrid { grid });
        }
        Ok(ExactSum {
            grid,
            count: 0,
            weight: 0,
            acc: vec![0; len],
        })
    }

    pub fn len(&self) -> usize {
        self.acc.len()
    }

    pub fn is_empty(&self) -> bool {
        self.acc.is_empty()
    }

    pub fn grid(&self) -> u32 {
        self.grid
    }

    /// Vectors added so far, merged ones included.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The exact total weight, in units of `2^-64`.
    pub fn weight_units(&self) -> i128 {
        self.weight
    }

    /// The sums, in units of `2^-grid`.
    pub fn values(&self) -> &[i128] {
        &self.acc
    }

    /// The largest `|w * x|` a term may have on this grid (exclusive).
    pub fn term_limit(&self) -> f64 {
        pow2(TERM_BITS as i32 - self.grid as i32)
    }

    fn check_count(&self, more: u64) -> Result<(), ExactError> {
        let count = self.count + more;
        if count > MAX_ADDS {
            return Err(ExactError::TooManyAdds { count });
        }
        Ok(())
    }
}

#[cfg(test)]
mod test_util {
    use super::pow2;

    /// Deterministic pseudo-random bits.
    pub(super) fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Finite f32 values over a wide range of exponents, signs and subnormals.
    pub(super) fn wild(seed: u64, n: usize, max_exp: i32) -> Vec<f32> {
        let mut r = rng(seed);
        (0..n)
            .map(|_| {
                let bits = r();
                let e = (bits % (max_exp + 150) as u64) as i32 - 149;
                let m = 1.0 + (bits >> 40) as f64 / (1u64 << 24) as f64;
                let v = (m * 2f64.powi(e)) as f32;
                if bits & (1 << 20) != 0 {
                    -v
                } else {
                    v
                }
            })
            .collect()
    }

    pub(super) fn ref_sum(xs: &[Vec<f32>], ws: &[f64], grid: u32) -> Vec<i128> {
        let scale = pow2(grid as i32);
        (0..xs[0].len())
            .map(|j| {
                xs.iter()
                    .zip(ws)
                    .map(|(x, &w)| (x[j] as f64 * w * scale).round_ties_even() as i128)
                    .sum()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{ref_sum, wild};
    use super::*;
    use crate::kernels::Input;

    #[test]
    fn sums_are_exact_and_order_independent() {
        let len = 70_001;
        let xs: Vec<Vec<f32>> = (0..6).map(|i| wild(10 + i, len, 20)).collect();
        let ws = [1.0, 0.1, 600.0, 1.0 / 3.0, 0.0, -2.5];
        let mut forward = ExactSum::new(len, DEFAULT_GRID).unwrap();
        for (x, &w) in xs.iter().zip(&ws) {
            forward.add(Input::F32(x), w, 1).unwrap();
        }
        assert_eq!(forward.values(), ref_sum(&xs, &ws, DEFAULT_GRID).as_slice());
        // Backwards, in two halves merged, with three threads.
        let mut a = ExactSum::new(len, DEFAULT_GRID).unwrap();
        let mut b = ExactSum::new(len, DEFAULT_GRID).unwrap();
        for (i, (x, &w)) in xs.iter().zip(&ws).enumerate().rev() {
            let part = if i % 2 == 0 { &mut a } else { &mut b };
            part.add(Input::F32(x), w, 3).unwrap();
        }
        b.merge(&a, 2).unwrap();
        assert_eq!(b, forward);
        assert_eq!(b.finish(1).unwrap(), forward.finish(4).unwrap());
        assert_eq!(b.count(), 6);
        let units: i128 = ws.iter().map(|w| (w * pow2(64)) as i128).sum();
        assert_eq!(b.weight_units(), units);
    }

    #[test]
    fn thread_counts_agree() {
        let len = 300_001;
        let x = wild(6, len, 15);
        let mut one = ExactSum::new(len, 70).unwrap();
        one.add(Input::F32(&x), 0.75, 1).unwrap();
        for threads in [2, 3, 8] {
            let mut many = ExactSum::new(len, 70).unwrap();
            many.add(Input::F32(&x), 0.75, threads).unwrap();
            assert_eq!(many, one);
            let a: Vec<u32> = one.finish(1).unwrap().iter().map(|v| v.to_bits()).collect();
            let b: Vec<u32> = many
                .finish(threads)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            ExactSum::new(3, MAX_GRID + 1),
            Err(ExactError::BadGrid { grid: MAX_GRID + 1 })
        );
        let mut s = ExactSum::new(3, 64).unwrap();
        let x = [1f32; 4];
        assert_eq!(
            s.add(Input::F32(&x), 1.0, 1),
            Err(ExactError::LengthMismatch {
                len: 4,
                expected: 3
            })
        );
        for w in [
            f64::NAN,
            f64::INFINITY,
            pow2(39),
            pow2(-70),
            0.1 * pow2(-20),
        ] {
            let got = s.add(Input::F32(&x[..3]), w, 1);
            assert!(
                matches!(got, Err(ExactError::BadWeight { value }) if value.to_bits() == w.to_bits()),
                "{w}"
            );
        }
        assert_eq!(s.finish(1), Err(ExactError::ZeroWeight));
        assert!(matches!(
            s.merge(&ExactSum::new(3, 65).unwrap(), 1),
            Err(ExactError::GridMismatch { .. })
        ));
        assert!(matches!(
            s.merge(&ExactSum::new(2, 64).unwrap(), 1),
            Err(ExactError::LengthMismatch { .. })
        ));
        let mut full = ExactSum::new(3, 64).unwrap();
        full.count = MAX_ADDS;
        assert!(matches!(
            full.add(Input::F32(&x[..3]), 1.0, 1),
            Err(ExactError::TooManyAdds { .. })
        ));
        s.count = 1;
        assert!(matches!(
            s.merge(&full, 1),
            Err(ExactError::TooManyAdds { .. })
        ));
        // A mean beyond f32: a huge sum over a tiny weight.
        let mut m = ExactSum::new(1, 0).unwrap();
        m.add(Input::F32(&[1e30]), 2.0, 1).unwrap();
        m.add(Input::F32(&[0.0]), -(2.0 - pow2(-40)), 1).unwrap();
        assert_eq!(m.finish(1), Err(ExactError::MeanOutOfRange { index: 0 }));
    }
}
