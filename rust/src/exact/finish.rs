//! Sums back to f32, each element rounded once: [`ExactSum::finish`] and
//! [`ExactSum::finish_sum`], a branch-free fast path (portable and AVX2) and the exact
//! settling of elements near a midpoint between two f32s.

use super::{par_chunks, pow2, ExactError, ExactSum, WEIGHT_GRID};

/// `(a / b) * 2^e` rounded once to the nearest f32, ties to even; `None` when that is
/// beyond the f32 range. Needs `b > 0` and `a, b < 2^127`. Exact long division: what
/// [`finish`] falls back on for subnormal and near-overflow results, and the reference the
/// faster paths are tested against.
pub fn round_ratio(a: u128, b: u128, e: i32) -> Option<f32> {
    if a == 0 {
        return Some(0.0);
    }
    // q and the sticky bit: a/b * 2^-k = q + (something in [0, 1) when sticky).
    let mut q = a / b;
    let mut r = a % b;
    let mut k: i32 = 0;
    while q < (1 << 26) {
        // r < b < 2^127, so 2r fits.
        r <<= 1;
        q <<= 1;
        if r >= b {
            r -= b;
            q |= 1;
        }
        k += 1;
    }
    let sticky = r != 0;
    // value = (q + frac) * 2^exp2
    let exp2 = e - k;
    let bits = 128 - q.leading_zeros() as i32;
    let top = bits - 1 + exp2;
    // Bits of q below the f32's last place: 24 kept for a normal, fewer for a subnormal.
    let shift = if top >= -126 { bits - 24 } else { -149 - exp2 };
    let (kept, rem) = match shift {
        0..=127 => (q >> shift, q & ((1u128 << shift) - 1)),
        128 => (0, q),
        // Below half the smallest subnormal.
        _ => return Some(0.0),
    };
    let half = 1u128 << (shift - 1);
    let round_up = rem > half || (rem == half && (sticky || kept & 1 == 1));
    let kept = kept + round_up as u128;
    // kept <= 2^24 and the scale is inside f64's range: the product is exact and fits f32
    // unless it overflows, which the conversion turns into Inf.
    let v = kept as f64 * pow2(exp2 + shift);
    let v32 = v as f32;
    v32.is_finite().then_some(v32)
}

/// `v` as f64, rounded once: `2^84 + hi32 * 2^32` and `2^52 + lo32` are exact bit
/// patterns, and one subtraction and one rounded add join them. The compiler's own scalar
/// conversion is this trick too; it is written out because AVX2 has no vector one, and
/// the vector loop must visibly do the same operations as this portable one.
#[inline(always)]
fn u64_to_f64(v: u64) -> f64 {
    let hi = f64::from_bits(0x4530_0000_0000_0000 | (v >> 32));
    let lo = f64::from_bits(0x4330_0000_0000_0000 | (v & 0xffff_ffff));
    (hi - (pow2(84) + pow2(52))) + lo
}

/// `m` as f64 with at most three roundings (no cancellation: both halves are >= 0). No
/// branch on whether the high half is zero: at the default grid that half is the sum's
/// integer part, so sums on both sides of magnitude 1 would make it unpredictable.
#[inline(always)]
fn approx_f64(m: u128) -> f64 {
    u64_to_f64((m >> 64) as u64) * pow2(64) + u64_to_f64(m as u64)
}

/// The fast path of one element of [`finish`]: `|a| * r` in f64 rounded to f32, with the
/// sign of `a` flipped by `neg_b`, and whether that f32 is certainly the correctly rounded
/// `(|a| / b) * 2^e` (`r` is `2^e / b` rounded).
///
/// The f64 value is within 6 f64 ulps of the true one (three roundings in `|a|`, one in
/// `b` as f64, one in `r`, one in the product), so unless it lies within 16 ulps of a
/// midpoint between two f32s, its f32 rounding is the correct one. Zero is exact; results
/// outside `[2^-125, 2^127)` (subnormal or near overflow) are left to [`finish_slow`].
/// Branch-free, so the loop over a block pipelines.
#[inline(always)]
fn finish_fast(a: i128, neg_b: bool, r: f64) -> (f32, bool) {
    let neg = (a < 0) != neg_b;
    let z = approx_f64(a.unsigned_abs()) * r;
    let extra = (z.to_bits() & ((1 << 29) - 1)) as i64;
    let in_range = z == 0.0 || (pow2(-125)..pow2(127)).contains(&z);
    let safe = in_range & ((extra - (1 << 28)).abs() > 16);
    let v = f32::from_bits((z as f32).to_bits() | ((neg as u32) << 31));
    (v, safe)
}

/// The sign of `m - c * b * 2^d`, given that its magnitude is below `2^127` (the two are
/// close): then the difference of both sides modulo `2^128` is the exact difference, so
/// wrapping 128-bit arithmetic settles it without any wider integers.
fn cmp_scaled(m: u128, c: u32, b: u128, d: i32) -> std::cmp::Ordering {
    // `x << s` modulo 2^128, for any s >= 0.
    let shl = |x: u128, s: u32| x.checked_shl(s).unwrap_or(0);
    let cb = (c as u128).wrapping_mul(b);
    let diff = if d >= 0 {
        m.wrapping_sub(shl(cb, d as u32))
    } else {
        shl(m, d.unsigned_abs()).wrapping_sub(cb)
    };
    (diff as i128).cmp(&0)
}

/// One element of [`finish`] where [`finish_fast`] is unsure: `(m / b) * 2^e` rounded once
/// to f32 (`m > 0`, magnitude only). `z` is the fast path's f64 estimate.
///
/// For a normal result near a midpoint, that midpoint `c * 2^k` (`c` odd, 25 bits) is
/// compared exactly with the true value: `m` against `c * b * 2^(k - e)`. The estimate is
/// within 6 f64 ulps of the true value and the other midpoints are 2^29 ulps away, so the
/// answer is one of the two f32s around this one; and the two sides differ by at most
/// 22 ulps, a `2^-47` relative difference of numbers below `2^153`, well inside what
/// [`cmp_scaled`] needs. Subnormal and near-overflow results
/// take the exact long division of [`round_ratio`].
fn finish_slow(m: u128, b: u128, e: i32, z: f64) -> Option<f32> {
    if m == 0 {
        return Some(0.0);
    }
    if !(pow2(-125)..pow2(127)).contains(&z) {
        return round_ratio(m, b, e);
    }
    let below = z.to_bits() & !((1 << 29) - 1);
    let mid = below | (1 << 28);
    let c = ((mid & ((1 << 52) - 1)) | (1 << 52)) >> 28;
    let k = ((mid >> 52) & 0x7ff) as i32 - 1075 + 28;
    // Exact: `below` keeps only the f32's bits of a normal value.
    let down = f64::from_bits(below) as f32;
    let ord = cmp_scaled(m, c as u32, b, k - e);
    // Ties to even. Integer arithmetic rather than a branch: the order is data-dependent
    // and a mispredicted branch costs as much as the rest of this function.
    let round_up = ord.is_gt() | (ord.is_eq() & (down.to_bits() & 1 == 1));
    Some(f32::from_bits(down.to_bits() + round_up as u32))
}

/// One element of [`finish`]: `(a / b) * 2^e` rounded once to f32, the sign of `a` times
/// the sign of `b` (given as `b_abs` and `neg_b`); `r` is `2^e / b_abs` in f64. What
/// [`finish_range`] does per element, for the tests.
#[cfg(test)]
fn finish_one(a: i128, b_abs: u128, neg_b: bool, r: f64, e: i32) -> Option<f32> {
    let (v, safe) = finish_fast(a, neg_b, r);
    if safe {
        return Some(v);
    }
    finish_unsure(a, b_abs, neg_b, r, e)
}

/// [`finish_one`] for an element [`finish_fast`] was unsure of.
fn finish_unsure(a: i128, b_abs: u128, neg_b: bool, r: f64, e: i32) -> Option<f32> {
    let m = a.unsigned_abs();
    let v = finish_slow(m, b_abs, e, approx_f64(m) * r)?;
    // The sign by bits, without a data-dependent branch.
    Some(f32::from_bits(
        v.to_bits() ^ ((((a < 0) != neg_b) as u32) << 31),
    ))
}

/// Elements per pass of [`finish_range`]: the fast loop over a block runs without
/// branches and lists the unsure elements, which a second loop settles.
const FINISH_PASS: usize = 1024;

/// [`finish_fast`] over one block: writes every output, lists the unsure elements'
/// indices in `unsure` and returns how many there are.
#[inline(always)]
fn finish_block(out: &mut [f32], src: &[i128], neg_b: bool, r: f64, unsure: &mut [u16]) -> usize {
    // Unconditional store, conditional count: no branch in the loop.
    let mut n = 0;
    for (j, (o, &a)) in out.iter_mut().zip(src).enumerate() {
        let (v, safe) = finish_fast(a, neg_b, r);
        *o = v;
        unsure[n] = j as u16;
        n += !safe as usize;
    }
    n
}

/// For each 4-bit mask, the positions of its set bits as u16 lanes, lowest first.
#[cfg(target_arch = "x86_64")]
const UNSURE_LANES: [u64; 16] = {
    let mut table = [0u64; 16];
    let mut mask = 0;
    while mask < 16 {
        let (mut lane, mut bit) = (0, 0);
        while bit < 4 {
            if mask >> bit & 1 == 1 {
                table[mask] |= (bit as u64) << (16 * lane);
                lane += 1;
            }
            bit += 1;
        }
        mask += 1;
    }
    table
};

/// [`finish_block`] four elements at a time: the same f64 operations (so the same bits),
/// with the 128-bit absolute values and the two u64 conversions in vector registers.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn finish_block_avx2(
    out: &mut [f32],
    src: &[i128],
    neg_b: bool,
    r: f64,
    unsure: &mut [u16],
) -> usize {
    use std::arch::x86_64::*;
    assert!(out.len() == src.len() && unsure.len() >= src.len());
    let main = src.len() / 4 * 4;
    let zero = _mm256_setzero_si256();
    let neg_bv = _mm256_set1_epi64x(-(neg_b as i64));
    let sign_bit = _mm256_set1_epi64x(i64::MIN);
    let low32 = _mm256_set1_epi64x(0xffff_ffff);
    let (exp84, exp52) = (
        _mm256_set1_epi64x(0x4530_0000_0000_0000),
        _mm256_set1_epi64x(0x4330_0000_0000_0000),
    );
    let join = _mm256_set1_pd(pow2(84) + pow2(52));
    let (two64, rv) = (_mm256_set1_pd(pow2(64)), _mm256_set1_pd(r));
    let (tiny, huge) = (_mm256_set1_pd(pow2(-125)), _mm256_set1_pd(pow2(127)));
    let extra_mask = _mm256_set1_epi64x((1 << 29) - 1);
    let (half, above, below) = (
        _mm256_set1_epi64x(1 << 28),
        _mm256_set1_epi64x(16),
        _mm256_set1_epi64x(-16),
    );
    let to_f64 = |v: __m256i| {
        let hi = _mm256_castsi256_pd(_mm256_or_si256(_mm256_srli_epi64::<32>(v), exp84));
        let lo = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(v, low32), exp52));
        _mm256_add_pd(_mm256_sub_pd(hi, join), lo)
    };
    let sp = src.as_ptr() as *const __m256i;
    let mut n = 0;
    let mut i = 0;
    while i < main {
        // SAFETY: i + 4 <= src.len() = out.len(): the two 32-byte loads (elements i..i+4)
        // and the 16-byte store are in bounds.
        let (v0, v1) = unsafe {
            (
                _mm256_loadu_si256(sp.add(i / 2)),
                _mm256_loadu_si256(sp.add(i / 2 + 1)),
            )
        };
        // [l0 l2 l1 l3] and [h0 h2 h1 h3], reordered to element order.
        let lo = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_unpacklo_epi64(v0, v1));
        let hi = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_unpackhi_epi64(v0, v1));
        // |a| = (a ^ s) - s for s = sign mask, the +1 carrying into the high word.
        let s = _mm256_cmpgt_epi64(zero, hi);
        let lo = _mm256_sub_epi64(_mm256_xor_si256(lo, s), s);
        let carry = _mm256_and_si256(s, _mm256_cmpeq_epi64(lo, zero));
        let hi = _mm256_sub_epi64(_mm256_xor_si256(hi, s), carry);
        let z = _mm256_mul_pd(
            _mm256_add_pd(_mm256_mul_pd(to_f64(hi), two64), to_f64(lo)),
            rv,
        );
        let extra = _mm256_sub_epi64(_mm256_and_si256(_mm256_castpd_si256(z), extra_mask), half);
        let far = _mm256_or_si256(
            _mm256_cmpgt_epi64(extra, above),
            _mm256_cmpgt_epi64(below, extra),
        );
        let in_range = _mm256_or_pd(
            _mm256_cmp_pd::<_CMP_EQ_OQ>(z, _mm256_setzero_pd()),
            _mm256_and_pd(
                _mm256_cmp_pd::<_CMP_GE_OQ>(z, tiny),
                _mm256_cmp_pd::<_CMP_LT_OQ>(z, huge),
            ),
        );
        let safe = _mm256_and_pd(in_range, _mm256_castsi256_pd(far));
        // Rounding to nearest is symmetric, so the sign can go on before the conversion.
        let neg = _mm256_and_si256(_mm256_xor_si256(s, neg_bv), sign_bit);
        let v = _mm256_cvtpd_ps(_mm256_xor_pd(z, _mm256_castsi256_pd(neg)));
        // SAFETY: see the loads above.
        unsafe { _mm_storeu_ps(out.as_mut_ptr().add(i), v) };
        // The unsure lanes' indices, packed to the front of four u16s by a table, go out in
        // one store; only the count moves. n + 4 <= i + 4 <= unsure.len().
        let bad = (!_mm256_movemask_pd(safe) & 0b1111) as usize;
        let packed = UNSURE_LANES[bad] + i as u64 * 0x0001_0001_0001_0001;
        unsure[n..n + 4].copy_from_slice(&[
            packed as u16,
            (packed >> 16) as u16,
            (packed >> 32) as u16,
            (packed >> 48) as u16,
        ]);
        n += bad.count_ones() as usize;
        i += 4;
    }
    let rest = finish_block(&mut out[main..], &src[main..], neg_b, r, &mut unsure[n..]);
    for u in &mut unsure[n..n + rest] {
        *u += main as u16;
    }
    n + rest
}

/// `out[j] = f32(src[j] / b * 2^e)`; `Err(j)` for the first element beyond f32's range.
#[inline(always)]
fn finish_range_with(
    out: &mut [f32],
    src: &[i128],
    b_abs: u128,
    neg_b: bool,
    r: f64,
    e: i32,
    block: impl Fn(&mut [f32], &[i128], &mut [u16]) -> usize,
) -> Result<(), usize> {
    let mut unsure = [0u16; FINISH_PASS];
    for (p, (out, src)) in out
        .chunks_mut(FINISH_PASS)
        .zip(src.chunks(FINISH_PASS))
        .enumerate()
    {
        let n = block(out, src, &mut unsure);
        for &j in &unsure[..n] {
            let j = j as usize;
            out[j] = finish_unsure(src[j], b_abs, neg_b, r, e).ok_or(p * FINISH_PASS + j)?;
        }
    }
    Ok(())
}

fn finish_range_portable(
    out: &mut [f32],
    src: &[i128],
    b_abs: u128,
    neg_b: bool,
    r: f64,
    e: i32,
) -> Result<(), usize> {
    finish_range_with(out, src, b_abs, neg_b, r, e, |o, s, u| {
        finish_block(o, s, neg_b, r, u)
    })
}

/// [`finish_range_portable`] with an AVX2 fast loop where the CPU has it (the same bits).
fn finish_range(
    out: &mut [f32],
    src: &[i128],
    b_abs: u128,
    neg_b: bool,
    r: f64,
    e: i32,
) -> Result<(), usize> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return finish_range_with(out, src, b_abs, neg_b, r, e, |o, s, u| {
            // SAFETY: the running CPU supports AVX2.
            unsafe { finish_block_avx2(o, s, neg_b, r, u) }
        });
    }
    finish_range_portable(out, src, b_abs, neg_b, r, e)
}

impl ExactSum {
    /// `out[j] = f32(acc[j] / b * 2^e)`, each rounded once.
    fn finish_scaled(
        &self,
        out: &mut [f32],
        b: i128,
        e: i32,
        threads: usize,
    ) -> Result<(), ExactError> {
        if out.len() != self.len() {
            return Err(ExactError::LengthMismatch {
                len: out.len(),
                expected: self.len(),
            });
        }
        let b_abs = b.unsigned_abs();
        // One rounding in `b` as f64, one in the division; the power of two is exact.
        let r = pow2(e) / b_abs as f64;
        let results = par_chunks(out, threads, |chunk, offset| {
            let src = &self.acc[offset..offset + chunk.len()];
            finish_range(chunk, src, b_abs, b < 0, r, e)
                .map_err(|j| ExactError::MeanOutOfRange { index: offset + j })
        });
        results.into_iter().collect()
    }

    /// The weighted mean `sum_i w_i x_i / sum_i w_i`, each element rounded once to f32.
    pub fn finish(&self, threads: usize) -> Result<Vec<f32>, ExactError> {
        let mut out = vec![0f32; self.len()];
        self.finish_into(&mut out, threads)?;
        Ok(out)
    }

    /// [`finish`](Self::finish) into `out` (of the sum's length). A caller that owns
    /// memory already faulted in, or backed by huge pages, saves the first-touch cost of
    /// a fresh allocation, which is larger than the rounding itself.
    pub fn finish_into(&self, out: &mut [f32], threads: usize) -> Result<(), ExactError> {
        if self.weight == 0 {
            return Err(ExactError::ZeroWeight);
        }
        let e = WEIGHT_GRID as i32 - self.grid as i32;
        self.finish_scaled(out, self.weight, e, threads)
    }

    /// The weighted sum `sum_i w_i x_i`, each element rounded once to f32. Always in range:
    /// `|acc| < 2^127` quanta of `2^-grid <= 1`, below f32's largest value.
    pub fn finish_sum(&self, threads: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.finish_sum_into(&mut out, threads)
            .expect("the output has the sum's length");
        out
    }

    /// [`finish_sum`](Self::finish_sum) into `out`; fails only on a length mismatch.
    pub fn finish_sum_into(&self, out: &mut [f32], threads: usize) -> Result<(), ExactError> {
        let e = -(self.grid as i32);
        self.finish_scaled(out, 1, e, threads)
            .map_err(|err| match err {
                ExactError::LengthMismatch { .. } => err,
                _ => unreachable!("a sum below 2^127 fits f32"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::test_util::rng;
    use crate::exact::DEFAULT_GRID;
    use crate::kernels::Input;

    #[test]
    fn round_ratio_matches_f64_where_exact() {
        // a/b exact in f64 (b a power of two): one f64 -> f32 rounding is the reference.
        let mut r = rng(2);
        for _ in 0..20_000 {
            let a = (r() >> 11) as u128;
            let e = (r() % 300) as i32 - 200;
            let want = (a as f64 * 2f64.powi(e)) as f32;
            assert_eq!(
                round_ratio(a, 1, e),
                want.is_finite().then_some(want),
                "{a} {e}"
            );
        }
        assert_eq!(round_ratio(1, 2, -149), Some(0.0)); // a tie at half the smallest: to even
        assert_eq!(round_ratio(3, 2, -149), Some(f32::from_bits(2)));
        assert_eq!(round_ratio(1, 3, 0), Some(1.0 / 3.0));
        assert_eq!(round_ratio(1, 1, 128), None);
    }

    #[test]
    fn fast_finish_agrees_with_long_division() {
        let mut r = rng(3);
        for _ in 0..100_000 {
            let a = ((r() as i128) << (r() % 62) >> (r() % 64)) * if r() & 1 == 0 { 1 } else { -1 };
            let b = ((r() >> (r() % 64)) as u128).max(1) << (r() % 60);
            let e = (r() % 100) as i32 - 60;
            let got = finish_one(a, b, false, pow2(e) / b as f64, e);
            let want = round_ratio(a.unsigned_abs(), b, e).map(|v| if a < 0 { -v } else { v });
            assert_eq!(got, want, "{a} {b} {e}");
        }
    }

    #[test]
    fn midpoints_settle_exactly() {
        // a = c * b * 2^s with c odd and 25 bits: (a / b) * 2^e is exactly the midpoint
        // c * 2^(s + e) between two f32s; a -/+ 1 lies just below/above it. Or b = b' * 2^t
        // and a = c * b' (the midpoint c * 2^(e - t)), with total weights up to 2^126 whose
        // product with c passes 2^128: both sides of the scaled comparison, and its
        // wrapping arithmetic.
        let mut r = rng(4);
        let mut slow = 0;
        for i in 0..100_000 {
            let c = ((r() % (1 << 24)) as u128) << 1 | 1 | 1 << 24;
            let b = ((r() >> (r() % 64)) as u128).max(1) << (r() % 37);
            let (b, base) = if i % 2 == 0 {
                let room = 126 - (128 - c.leading_zeros()) - (128 - b.leading_zeros());
                (b, (c * b) << (r() % (room.min(30) as u64 + 1)))
            } else {
                (b << (r() % 27), c * b)
            };
            let a = base as i128 + (i % 3) as i128 - 1;
            let e = (r() % 120) as i32 - 80;
            let neg_b = r() & 1 == 0;
            let a = if r() & 1 == 0 { -a } else { a };
            let r_ = pow2(e) / b as f64;
            let got = finish_one(a, b, neg_b, r_, e);
            let want =
                round_ratio(a.unsigned_abs(), b, e).map(|v| if (a < 0) != neg_b { -v } else { v });
            assert_eq!(got, want, "{a} {b} {e}");
            slow += !finish_fast(a, neg_b, r_).1 as usize;
        }
        // Most of these take the exact comparison.
        assert!(slow > 50_000, "{slow}");
    }

    #[test]
    fn finish_dispatch_agrees_with_long_division() {
        // Blocks of every kind of element, an odd length, both signs of the weight; the
        // vector and portable loops against the exact reference, element by element.
        let mut r = rng(6);
        let b: u128 = 0x1234_5678_9abc_def0_1357 << 3;
        let src: Vec<i128> = (0..5003)
            .map(|i| {
                let v = match i % 8 {
                    // Zero, and whole multiples of 2^64 (a carry in |a|).
                    0 if i % 16 == 0 => 0,
                    0 => ((r() >> 30) as i128) << 64,
                    1 => -1,
                    2 => (r() as i128) << 40 >> (r() % 100),
                    // Exact midpoints of the mean and their neighbours.
                    3..=5 => {
                        let c = (r() % (1 << 24)) as i128 * 2 + 1 + (1 << 24);
                        ((c * b as i128) << (r() % 20) >> 3) + (i % 8) as i128 - 4
                    }
                    6 => r() as i128, // tiny means (subnormal after scaling below)
                    _ => ((r() as i128) << 63) + r() as i128,
                };
                if r() & 1 == 0 {
                    -v
                } else {
                    v
                }
            })
            .collect();
        for (e, neg_b) in [
            (0, false),
            (0, true),
            (-40, false),
            (-200, true),
            (90, false),
        ] {
            let rr = pow2(e) / b as f64;
            let (mut x, mut y) = (vec![0f32; src.len()], vec![0f32; src.len()]);
            let got = finish_range(&mut x, &src, b, neg_b, rr, e);
            let port = finish_range_portable(&mut y, &src, b, neg_b, rr, e);
            assert_eq!(got, port);
            let unsure = src
                .iter()
                .filter(|&&a| !finish_fast(a, neg_b, rr).1)
                .count();
            assert!(unsure > 500, "{unsure}");
            let want = src
                .iter()
                .position(|&a| round_ratio(a.unsigned_abs(), b, e).is_none());
            assert_eq!(got.err(), want, "{e}");
            let end = want.unwrap_or(src.len()) / FINISH_PASS * FINISH_PASS;
            for (j, &a) in src[..end].iter().enumerate() {
                let w = round_ratio(a.unsigned_abs(), b, e).unwrap();
                let w = if (a < 0) != neg_b { -w } else { w };
                assert_eq!(x[j].to_bits(), w.to_bits(), "{j} {a} {e}");
                assert_eq!(y[j].to_bits(), w.to_bits(), "{j} {a} {e}");
            }
        }
    }

    #[test]
    fn u64_conversion_rounds_once() {
        let mut r = rng(5);
        for _ in 0..100_000 {
            let v = r() >> (r() % 64);
            assert_eq!(u64_to_f64(v), v as f64, "{v}");
        }
        for v in [
            0,
            1,
            u64::MAX,
            1 << 63,
            (1 << 53) + 1,
            (1 << 63) + (1 << 10),
        ] {
            assert_eq!(u64_to_f64(v), v as f64, "{v}");
        }
    }

    #[test]
    fn mean_is_rounded_once() {
        // 1 and 1 + 2^-23 with equal weights: the mean is a tie, which goes to even.
        let a = [1.0f32];
        let b = [1.0 + f32::EPSILON];
        let mut s = ExactSum::new(1, DEFAULT_GRID).unwrap();
        s.add(Input::F32(&a), 3.0, 1).unwrap();
        s.add(Input::F32(&b), 3.0, 1).unwrap();
        assert_eq!(s.finish(1).unwrap(), vec![1.0]);
        assert_eq!(s.finish_sum(1), vec![6.0 + 3.0 * f32::EPSILON]);
        s.add(Input::F32(&b), 6.0, 1).unwrap();
        // (3 + 3(1+e) + 6(1+e)) / 12 = 1 + 0.75e: rounds up to 1 + e.
        assert_eq!(s.finish(1).unwrap(), vec![1.0 + f32::EPSILON]);
        let mut out = [0f32; 1];
        s.finish_into(&mut out, 1).unwrap();
        assert_eq!(out, [1.0 + f32::EPSILON]);
        s.finish_sum_into(&mut out, 1).unwrap();
        assert_eq!(out, [12.0 + 9.0 * f32::EPSILON]);
        let wrong = Err(ExactError::LengthMismatch {
            len: 2,
            expected: 1,
        });
        assert_eq!(s.finish_into(&mut [0.0; 2], 1), wrong);
        assert_eq!(s.finish_sum_into(&mut [0.0; 2], 1), wrong);
    }
}
