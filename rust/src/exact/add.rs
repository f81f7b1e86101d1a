//! Terms onto the grid and into the sums: [`ExactSum::add`] and [`ExactSum::merge`],
//! with a portable and an AVX2 kernel that give the same bits.

use half::slice::HalfFloatSliceExt;

use super::{par_chunks, pow2, ExactError, ExactSum, BLOCK, TERM_LIMIT, WEIGHT_GRID, WEIGHT_LIMIT};
use crate::kernels::Input;

/// Rounds `s` (`|s| < 2^103`, else it becomes 0 and `false` comes back) to the nearest
/// integer, ties to even, as an `i128`.
///
/// Only f64 adds and multiplies, so the loop around it vectorises: `hi` is `s / 2^52`
/// rounded (`|hi| < 2^51`), `lo = s - hi * 2^52` is exact (both are multiples of
/// `ulp(s)` and `|lo| <= 2^51`), and adding then subtracting `1.5 * 2^52` rounds a value
/// below `2^51` to an integer that sits in the low mantissa bits.
#[inline(always)]
fn to_grid(s: f64) -> (i128, bool) {
    let (hi, lo, ok) = grid_parts(s);
    (join(hi, lo), ok)
}

/// [`to_grid`]'s integer as `hi * 2^52 + lo`.
#[inline(always)]
fn grid_parts(s: f64) -> (i64, i64, bool) {
    const MAGIC: f64 = pow2(52) + pow2(51);
    let ok = s.abs() < TERM_LIMIT;
    let s = if ok { s } else { 0.0 };
    let hi = (s * pow2(-52) + MAGIC) - MAGIC;
    let lo = s - hi * pow2(52);
    // The bit patterns of MAGIC + v for integers |v| <= 2^51 are consecutive.
    let hi_i = (hi + MAGIC).to_bits() as i64 - MAGIC.to_bits() as i64;
    let lo_i = (lo + MAGIC).to_bits() as i64 - MAGIC.to_bits() as i64;
    (hi_i, lo_i, ok)
}

#[inline(always)]
fn join(hi: i64, lo: i64) -> i128 {
    ((hi as i128) << 52) + lo as i128
}

/// Terms converted per pass: the two i64 scratch arrays (16 KiB) stay in L1.
const PASS: usize = 1024;

/// `acc[j] +=` (or `-=` when `SUB`) the grid integer of `x[j] * ws`. False when some
/// term was out of range or not finite (it then counts as 0).
///
/// Two loops per pass: the float work, which vectorises, into i64 halves; then the
/// 128-bit adds, which do not.
#[inline(always)]
fn add_f32<const SUB: bool>(acc: &mut [i128], x: &[f32], ws: f64) -> bool {
    let mut ok = true;
    let mut his = [0i64; PASS];
    let mut los = [0i64; PASS];
    for (acc, x) in acc.chunks_mut(PASS).zip(x.chunks(PASS)) {
        for ((&v, hi), lo) in x.iter().zip(&mut his).zip(&mut los) {
            let (h, l, good) = grid_parts(v as f64 * ws);
            (*hi, *lo) = (h, l);
            ok &= good;
        }
        for ((a, &hi), &lo) in acc.iter_mut().zip(&his).zip(&los) {
            let n = join(hi, lo);
            // No wrap is possible (see the module doc); wrapping ops say so to the compiler.
            *a = if SUB {
                a.wrapping_sub(n)
            } else {
                a.wrapping_add(n)
            };
        }
    }
    ok
}

/// Runs `kernel(acc_block, x_block, ws)` over `x[offset..offset + acc.len()]`, widening
/// f16/bf16 inputs to f32 a block at a time.
#[inline(always)]
fn add_range_with(
    acc: &mut [i128],
    x: Input<'_>,
    offset: usize,
    ws: f64,
    kernel: impl Fn(&mut [i128], &[f32], f64) -> bool,
) -> bool {
    let end = offset + acc.len();
    match x {
        Input::F32(x) => kernel(acc, &x[offset..end], ws),
        Input::F16(_) | Input::BF16(_) => {
            let mut scratch = [0f32; BLOCK];
            let mut ok = true;
            for (i, block) in acc.chunks_mut(BLOCK).enumerate() {
                let (s, e) = (offset + i * BLOCK, offset + i * BLOCK + block.len());
                let slot = &mut scratch[..block.len()];
                match x {
                    Input::F16(h) => h[s..e].convert_to_f32_slice(slot),
                    Input::BF16(b) => b[s..e].convert_to_f32_slice(slot),
                    Input::F32(_) => unreachable!(),
                }
                ok &= kernel(block, slot, ws);
            }
            ok
        }
    }
}

fn add_range_portable<const SUB: bool>(
    acc: &mut [i128],
    x: Input<'_>,
    offset: usize,
    ws: f64,
) -> bool {
    add_range_with(acc, x, offset, ws, add_f32::<SUB>)
}

/// [`add_range_portable`] with an AVX2 kernel where the CPU has it. Both compute the same
/// integers with the same f64 operations (no fused multiply-add), so the dispatch cannot
/// change bits.
fn add_range<const SUB: bool>(acc: &mut [i128], x: Input<'_>, offset: usize, ws: f64) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return add_range_with(acc, x, offset, ws, |a, x, ws| {
            // SAFETY: the running CPU supports AVX2.
            unsafe { add_f32_avx2::<SUB>(a, x, ws) }
        });
    }
    add_range_portable::<SUB>(acc, x, offset, ws)
}

/// [`add_f32`] four terms at a time, the 128-bit adds included: the scalar version spends
/// most of its time on the i128 carries, which the compiler does not vectorise.
///
/// Per lane, `grid_parts` gives `n = hi * 2^52 + lo` (`|hi| <= 2^51`, `|lo| <= 2^51`);
/// as two 64-bit words that is `low = (hi << 52) + lo` (mod 2^64) and
/// `high = (hi >> 12) + (lo < 0 ? -1 : 0) + carry(low)`, added to the accumulator's words
/// with a carry from the low word.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_f32_avx2<const SUB: bool>(acc: &mut [i128], x: &[f32], ws: f64) -> bool {
    use std::arch::x86_64::*;
    const MAGIC: f64 = pow2(52) + pow2(51);
    assert_eq!(acc.len(), x.len());
    let main = x.len() / 4 * 4;
    let ws_v = _mm256_set1_pd(ws);
    let limit = _mm256_set1_pd(TERM_LIMIT);
    let abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(i64::MAX));
    let magic = _mm256_set1_pd(MAGIC);
    let magic_bits = _mm256_set1_epi64x(MAGIC.to_bits() as i64);
    let (up, down) = (_mm256_set1_pd(pow2(52)), _mm256_set1_pd(pow2(-52)));
    // AVX2 has no 64-bit arithmetic shift: (hi + 2^51) >> 12 is floor(hi / 2^12) + 2^39.
    let (bias, bias_out) = (_mm256_set1_epi64x(1 << 51), _mm256_set1_epi64x(1 << 39));
    // Unsigned compares as signed ones on values with the top bit flipped.
    let flip = _mm256_set1_epi64x(i64::MIN);
    let zero = _mm256_setzero_si256();
    let mut ok = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
    let xp = x.as_ptr();
    let ap = acc.as_mut_ptr() as *mut __m256i;
    let mut i = 0;
    while i < main {
        // SAFETY: i + 4 <= x.len() = acc.len(), so the 4 floats read here and the two
        // 32-byte (2 x i128) accumulator blocks at i/2 and i/2 + 1 are in bounds.
        unsafe {
            // Terms in the order [0 2 1 3], which is how the accumulator's words unpack.
            let xs = _mm_permute_ps::<0b11_01_10_00>(_mm_loadu_ps(xp.add(i)));
            let s = _mm256_mul_pd(_mm256_cvtps_pd(xs), ws_v);
            let good = _mm256_cmp_pd::<_CMP_LT_OQ>(_mm256_and_pd(s, abs_mask), limit);
            ok = _mm256_and_pd(ok, good);
            let s = _mm256_and_pd(s, good);
            let t = _mm256_add_pd(_mm256_mul_pd(s, down), magic);
            let hi = _mm256_sub_pd(t, magic);
            let lo = _mm256_sub_pd(s, _mm256_mul_pd(hi, up));
            let hi_i = _mm256_sub_epi64(_mm256_castpd_si256(t), magic_bits);
            let lo_i = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(lo, magic)), magic_bits);
            let shifted = _mm256_slli_epi64::<52>(hi_i);
            let low = _mm256_add_epi64(shifted, lo_i);
            let carry =
                _mm256_cmpgt_epi64(_mm256_xor_si256(shifted, flip), _mm256_xor_si256(low, flip));
            let top = _mm256_sub_epi64(
                _mm256_srli_epi64::<12>(_mm256_add_epi64(hi_i, bias)),
                bias_out,
            );
            let high =
                _mm256_sub_epi64(_mm256_add_epi64(top, _mm256_cmpgt_epi64(zero, lo_i)), carry);
            // Accumulator blocks [l0 h0 | l1 h1] and [l2 h2 | l3 h3] unpack to
            // [l0 l2 | l1 l3] and [h0 h2 | h1 h3], the terms' order; 128-bit adds in that
            // form, with the low word's carry, then the same unpacks restore the layout.
            let p = ap.add(i / 2);
            let (a0, a1) = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
            let (a_lo, a_hi) = (_mm256_unpacklo_epi64(a0, a1), _mm256_unpackhi_epi64(a0, a1));
            let (r_lo, r_hi) = if SUB {
                let r_lo = _mm256_sub_epi64(a_lo, low);
                let borrow =
                    _mm256_cmpgt_epi64(_mm256_xor_si256(low, flip), _mm256_xor_si256(a_lo, flip));
                (r_lo, _mm256_add_epi64(_mm256_sub_epi64(a_hi, high), borrow))
            } else {
                let r_lo = _mm256_add_epi64(a_lo, low);
                let carry =
                    _mm256_cmpgt_epi64(_mm256_xor_si256(a_lo, flip), _mm256_xor_si256(r_lo, flip));
                (r_lo, _mm256_sub_epi64(_mm256_add_epi64(a_hi, high), carry))
            };
            _mm256_storeu_si256(p, _mm256_unpacklo_epi64(r_lo, r_hi));
            _mm256_storeu_si256(p.add(1), _mm256_unpackhi_epi64(r_lo, r_hi));
        }
        i += 4;
    }
    let tail = add_f32::<SUB>(&mut acc[main..], &x[main..], ws);
    tail && _mm256_movemask_pd(ok) == 0b1111
}

fn input_value(x: &Input<'_>, j: usize) -> f64 {
    match x {
        Input::F32(v) => v[j] as f64,
        Input::F16(v) => v[j].to_f64(),
        Input::BF16(v) => v[j].to_f64(),
    }
}

impl ExactSum {
    /// Adds `weight * x`. On any error nothing is added.
    pub fn add(&mut self, x: Input<'_>, weight: f64, threads: usize) -> Result<(), ExactError> {
        if x.len() != self.len() {
            return Err(ExactError::LengthMismatch {
                len: x.len(),
                expected: self.len(),
            });
        }
        let units = weight * pow2(WEIGHT_GRID as i32);
        // False for NaN too.
        let exact = weight.abs() < WEIGHT_LIMIT && units.fract() == 0.0;
        if !exact {
            return Err(ExactError::BadWeight { value: weight });
        }
        self.check_count(1)?;
        // Exact: scaling by a power of two, and w * 2^grid stays far from f64's limits.
        let ws = weight * pow2(self.grid as i32);
        let ok = par_chunks(&mut self.acc, threads, |chunk, offset| {
            add_range::<false>(chunk, x, offset, ws)
        });
        if ok.iter().all(|&o| o) {
            self.count += 1;
            self.weight += to_grid(units).0;
            return Ok(());
        }
        // Refused: subtracting the same integers (bad terms were 0) restores every bit.
        par_chunks(&mut self.acc, threads, |chunk, offset| {
            add_range::<true>(chunk, x, offset, ws)
        });
        Err(self.classify(x, weight, ws))
    }

    /// The error for a refused vector: its first NaN or Inf, else its first term out of range.
    fn classify(&self, x: Input<'_>, weight: f64, ws: f64) -> ExactError {
        let n = x.len();
        if let Some(index) = (0..n).find(|&j| !input_value(&x, j).is_finite()) {
            return ExactError::NonFinite {
                index,
                value: input_value(&x, index),
            };
        }
        let index = (0..n)
            .find(|&j| !to_grid(input_value(&x, j) * ws).1)
            .expect("a refused vector has a bad term");
        ExactError::TermOutOfRange {
            index,
            value: input_value(&x, index),
            weight,
            limit: self.term_limit(),
        }
    }

    /// Adds `other` into this sum.
    pub fn merge(&mut self, other: &ExactSum, threads: usize) -> Result<(), ExactError> {
        if other.len() != self.len() {
            return Err(ExactError::LengthMismatch {
                len: other.len(),
                expected: self.len(),
            });
        }
        if other.grid != self.grid {
            return Err(ExactError::GridMismatch {
                grid: other.grid,
                expected: self.grid,
            });
        }
        self.check_count(other.count)?;
        par_chunks(&mut self.acc, threads, |chunk, offset| {
            let src = &other.acc[offset..offset + chunk.len()];
            for (a, b) in chunk.iter_mut().zip(src) {
                // Both respect |v| <= count * (2^103 - 1), and the counts' sum is checked.
                *a = a.wrapping_add(*b);
            }
        });
        self.count += other.count;
        self.weight += other.weight;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::test_util::{ref_sum, rng, wild};
    use crate::exact::DEFAULT_GRID;
    use half::{bf16, f16};

    #[test]
    fn to_grid_rounds_to_nearest_even() {
        for (s, n) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.5, -2),
            (0.49, 0),
            (3.0, 3),
            (-7.75, -8),
            (1e-300, 0),
        ] {
            assert_eq!(to_grid(s), (n, true), "{s}");
        }
        let big = pow2(102) * 1.5;
        assert_eq!(to_grid(big), (3i128 << 101, true));
        assert_eq!(to_grid(-big), (-(3i128 << 101), true));
        let near = f64::from_bits(TERM_LIMIT.to_bits() - 1);
        assert_eq!(to_grid(near).0, (1i128 << 103) - (1i128 << 50));
        assert!(!to_grid(TERM_LIMIT).1);
        assert!(!to_grid(f64::NAN).1);
        assert!(!to_grid(f64::NEG_INFINITY).1);
        // Every integer magnitude class round trips.
        let mut r = rng(1);
        for _ in 0..10_000 {
            let s = f64::from_bits(r()) % TERM_LIMIT;
            if s.is_finite() {
                let (n, ok) = to_grid(s);
                assert!(ok);
                assert_eq!(n as f64, s.round_ties_even(), "{s}");
            }
        }
    }

    #[test]
    fn half_inputs() {
        let x = wild(5, 9000, 10);
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let bb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        for (input, widened) in [
            (
                Input::F16(&h),
                h.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            ),
            (Input::BF16(&bb), bb.iter().map(|v| v.to_f32()).collect()),
        ] {
            let mut s = ExactSum::new(x.len(), 80).unwrap();
            s.add(input, 7.0, 2).unwrap();
            assert_eq!(s.values(), ref_sum(&[widened], &[7.0], 80).as_slice());
        }
    }

    #[test]
    fn dispatch_agrees_with_portable() {
        // Odd lengths (vector tails), every sign and carry pattern, terms near the limit,
        // bad terms (counted as 0), adds and subtracts from nonzero starting sums.
        for (seed, len, max_exp, ws) in [
            (7, 10_003, 30, 3.0 * pow2(50)),
            (11, 4097, 60, -pow2(64)),
            (12, 999, 100, 1.0),
            (13, 5, 20, -0.1 * pow2(70)),
            (14, 8191, 127, pow2(-20)),
        ] {
            let mut x = wild(seed, len, max_exp);
            x[len / 3] = f32::NAN;
            x[len / 2] = f32::NEG_INFINITY;
            let mut r = rng(seed);
            let start: Vec<i128> = (0..len)
                .map(|_| ((r() as i128) << 64 | r() as i128) >> 2)
                .collect();
            for sub in [false, true] {
                let (mut a, mut b) = (start.clone(), start.clone());
                let (oa, ob) = if sub {
                    (
                        add_range_portable::<true>(&mut a, Input::F32(&x), 0, ws),
                        add_range::<true>(&mut b, Input::F32(&x), 0, ws),
                    )
                } else {
                    (
                        add_range_portable::<false>(&mut a, Input::F32(&x), 0, ws),
                        add_range::<false>(&mut b, Input::F32(&x), 0, ws),
                    )
                };
                assert!(!oa && !ob);
                assert_eq!(a, b, "seed {seed} sub {sub}");
            }
            // Without the bad values both succeed, and add then subtract restores the sum.
            x[len / 3] = 1.0;
            x[len / 2] = -1.0;
            let mut b = start.clone();
            let fine = x.iter().all(|&v| to_grid(v as f64 * ws).1);
            assert_eq!(add_range::<false>(&mut b, Input::F32(&x), 0, ws), fine);
            assert_eq!(add_range::<true>(&mut b, Input::F32(&x), 0, ws), fine);
            assert_eq!(b, start);
        }
    }

    #[test]
    fn refused_vectors_change_nothing() {
        let len = 200_000;
        let x = wild(8, len, 20);
        let mut s = ExactSum::new(len, DEFAULT_GRID).unwrap();
        s.add(Input::F32(&x), 2.0, 2).unwrap();
        let before = s.clone();
        let mut bad = x.clone();
        bad[150_000] = f32::NAN;
        bad[190_000] = 1e30;
        assert!(matches!(
            s.add(Input::F32(&bad), 1.0, 2),
            Err(ExactError::NonFinite { index: 150_000, .. })
        ));
        assert_eq!(s, before);
        bad[150_000] = 1.0;
        let limit = s.term_limit();
        assert_eq!(
            s.add(Input::F32(&bad), 1.0, 3),
            Err(ExactError::TermOutOfRange {
                index: 190_000,
                value: 1e30f32 as f64,
                weight: 1.0,
                limit
            })
        );
        assert_eq!(s, before);
        // Just inside and just outside the limit.
        let mut edge = ExactSum::new(2, DEFAULT_GRID).unwrap();
        let inside = [f32::from_bits((limit as f32).to_bits() - 1), -1.0];
        edge.add(Input::F32(&inside), 1.0, 1).unwrap();
        assert!(edge.add(Input::F32(&[limit as f32, 0.0]), 1.0, 1).is_err());
        let inf = [f16::INFINITY];
        let mut h = ExactSum::new(1, 10).unwrap();
        assert!(matches!(
            h.add(Input::F16(&inf), 1.0, 1),
            Err(ExactError::NonFinite { index: 0, .. })
        ));
    }
}
