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

use std::fmt;

use half::slice::HalfFloatSliceExt;

use crate::kernels::Input;

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

/// Why corrupt or truncated bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    TooShort {
        len: usize,
    },
    Magic,
    Version {
        found: u32,
    },
    Grid {
        grid: u32,
    },
    Count {
        count: u64,
    },
    Size {
        len: usize,
        expected: u128,
    },
    /// `None` for the total weight, else the element index.
    Value {
        index: Option<usize>,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::TooShort { len } => {
                write!(
                    f,
                    "{len} bytes is shorter than the {HEADER_LEN}-byte header"
                )
            }
            FormatError::Magic => write!(f, "bad magic: not an emberfl exact sum"),
            FormatError::Version { found } => {
                write!(
                    f,
                    "unsupported version {found} (this build reads {VERSION})"
                )
            }
            FormatError::Grid { grid } => write!(f, "grid {grid} is above {MAX_GRID}"),
            FormatError::Count { count } => {
                write!(f, "count {count} is above the limit of {MAX_ADDS} vectors")
            }
            FormatError::Size { len, expected } => write!(
                f,
                "{len} bytes, but the header's length needs {expected} (truncated or padded)"
            ),
            FormatError::Value { index: None } => {
                write!(f, "the total weight exceeds what its count allows")
            }
            FormatError::Value { index: Some(i) } => {
                write!(f, "element {i} exceeds what the count allows")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExactError {
    BadGrid {
        grid: u32,
    },
    LengthMismatch {
        len: usize,
        expected: usize,
    },
    GridMismatch {
        grid: u32,
        expected: u32,
    },
    /// Not finite, `|w| >= 2^39`, or not a multiple of `2^-64`.
    BadWeight {
        value: f64,
    },
    /// `x[index]` is NaN or Inf.
    NonFinite {
        index: usize,
        value: f64,
    },
    /// `|weight * x[index]|` is not below `limit`.
    TermOutOfRange {
        index: usize,
        value: f64,
        weight: f64,
        limit: f64,
    },
    TooManyAdds {
        count: u64,
    },
    ZeroWeight,
    /// The mean at `index` is beyond the f32 range.
    MeanOutOfRange {
        index: usize,
    },
    Format(FormatError),
}

impl fmt::Display for ExactError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExactError::BadGrid { grid } => {
                write!(f, "grid {grid} is out of range: it must be 0..={MAX_GRID}")
            }
            ExactError::LengthMismatch { len, expected } => write!(
                f,
                "the vector has {len} elements but the sum has {expected}"
            ),
            ExactError::GridMismatch { grid, expected } => write!(
                f,
                "cannot merge a sum on grid 2^-{grid} into one on grid 2^-{expected}"
            ),
            ExactError::BadWeight { value } => write!(
                f,
                "weight {value} is not exact: weights must be finite, of magnitude below \
                 2^39 and multiples of 2^-64"
            ),
            ExactError::NonFinite { index, value } => {
                write!(f, "the vector holds {value} at index {index}")
            }
            ExactError::TermOutOfRange {
                index,
                value,
                weight,
                limit,
            } => write!(
                f,
                "weight * x[{index}] = {weight} * {value} is out of range: terms must be \
                 below {limit:e} in magnitude on this grid"
            ),
            ExactError::TooManyAdds { count } => write!(
                f,
                "{count} vectors exceed the limit of {MAX_ADDS} in one exact sum"
            ),
            ExactError::ZeroWeight => {
                write!(f, "the total weight is zero: the mean is undefined")
            }
            ExactError::MeanOutOfRange { index } => {
                write!(f, "the mean at index {index} is beyond the float32 range")
            }
            ExactError::Format(e) => write!(f, "corrupt exact sum bytes: {e}"),
        }
    }
}

impl std::error::Error for ExactError {}

impl From<FormatError> for ExactError {
    fn from(e: FormatError) -> Self {
        ExactError::Format(e)
    }
}

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

fn input_value(x: &Input<'_>, j: usize) -> f64 {
    match x {
        Input::F32(v) => v[j] as f64,
        Input::F16(v) => v[j].to_f64(),
        Input::BF16(v) => v[j].to_f64(),
    }
}

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

    /// Bytes in [`to_bytes`](Self::to_bytes)' format.
    pub fn byte_len(&self) -> usize {
        HEADER_LEN + 16 * self.len()
    }

    /// Writes the byte format (see the module doc) into `buf` of [`byte_len`](Self::byte_len).
    pub fn write_bytes(&self, buf: &mut [u8]) {
        assert_eq!(buf.len(), self.byte_len(), "buffer size");
        let (head, body) = buf.split_at_mut(HEADER_LEN);
        head[0..8].copy_from_slice(&MAGIC);
        head[8..12].copy_from_slice(&VERSION.to_le_bytes());
        head[12..16].copy_from_slice(&self.grid.to_le_bytes());
        head[16..24].copy_from_slice(&(self.len() as u64).to_le_bytes());
        head[24..32].copy_from_slice(&self.count.to_le_bytes());
        head[32..48].copy_from_slice(&self.weight.to_le_bytes());
        for (dst, v) in body.chunks_exact_mut(16).zip(&self.acc) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.byte_len()];
        self.write_bytes(&mut buf);
        buf
    }

    /// Reads [`to_bytes`](Self::to_bytes)' format, checking every field.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ExactError> {
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::TooShort { len: bytes.len() }.into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let i128_at =
            |i: usize| i128::from_le_bytes(bytes[i..i + 16].try_into().expect("16 bytes"));
        if bytes[0..8] != MAGIC {
            return Err(FormatError::Magic.into());
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(FormatError::Version { found: version }.into());
        }
        let grid = u32_at(12);
        if grid > MAX_GRID {
            return Err(FormatError::Grid { grid }.into());
        }
        let len = u64_at(16);
        let count = u64_at(24);
        if count > MAX_ADDS {
            return Err(FormatError::Count { count }.into());
        }
        let expected = HEADER_LEN as u128 + 16 * len as u128;
        if bytes.len() as u128 != expected {
            return Err(FormatError::Size {
                len: bytes.len(),
                expected,
            }
            .into());
        }
        // What `count` terms of magnitude < 2^103 can reach; more means corruption.
        let bound = count as u128 * ((1u128 << TERM_BITS) - 1);
        let weight = i128_at(32);
        if weight.unsigned_abs() > bound {
            return Err(FormatError::Value { index: None }.into());
        }
        let mut acc = Vec::with_capacity(len as usize);
        for (index, chunk) in bytes[HEADER_LEN..].chunks_exact(16).enumerate() {
            let v = i128::from_le_bytes(chunk.try_into().expect("16 bytes"));
            if v.unsigned_abs() > bound {
                return Err(FormatError::Value { index: Some(index) }.into());
            }
            acc.push(v);
        }
        Ok(ExactSum {
            grid,
            count,
            weight,
            acc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Deterministic pseudo-random bits.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Finite f32 values over a wide range of exponents, signs and subnormals.
    fn wild(seed: u64, n: usize, max_exp: i32) -> Vec<f32> {
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

    fn ref_sum(xs: &[Vec<f32>], ws: &[f64], grid: u32) -> Vec<i128> {
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

    #[test]
    fn bytes_round_trip_and_corruption() {
        let x = wild(9, 1000, 10);
        let mut s = ExactSum::new(x.len(), 72).unwrap();
        s.add(Input::F32(&x), 5.0, 1).unwrap();
        s.add(Input::F32(&x), -0.25, 1).unwrap();
        let bytes = s.to_bytes();
        assert_eq!(bytes.len(), HEADER_LEN + 16 * 1000);
        assert_eq!(&bytes[..8], b"EMBFLXS\0");
        assert_eq!(ExactSum::from_bytes(&bytes).unwrap(), s);
        let err = |b: &[u8]| match ExactSum::from_bytes(b) {
            Err(ExactError::Format(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(err(&bytes[..10]), FormatError::TooShort { len: 10 });
        assert!(matches!(
            err(&bytes[..bytes.len() - 1]),
            FormatError::Size { .. }
        ));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert_eq!(err(&b), FormatError::Magic);
        let mut b = bytes.clone();
        b[8] = 2;
        assert_eq!(err(&b), FormatError::Version { found: 2 });
        let mut b = bytes.clone();
        b[12] = 200;
        assert_eq!(err(&b), FormatError::Grid { grid: 200 });
        let mut b = bytes.clone();
        b[16] = 0xff;
        assert!(matches!(err(&b), FormatError::Size { .. }));
        let mut b = bytes.clone();
        b[31] = 1;
        assert!(matches!(err(&b), FormatError::Count { .. }));
        let mut b = bytes.clone();
        b[47] = 0x40;
        assert_eq!(err(&b), FormatError::Value { index: None });
        let mut b = bytes.clone();
        b[HEADER_LEN + 16 * 7 + 15] ^= 0x40;
        assert_eq!(err(&b), FormatError::Value { index: Some(7) });
        // An empty sum round trips too.
        let empty = ExactSum::new(0, 0).unwrap();
        assert_eq!(ExactSum::from_bytes(&empty.to_bytes()).unwrap(), empty);
    }
}
