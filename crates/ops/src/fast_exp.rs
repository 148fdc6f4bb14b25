//! A vectorizable `exp` for the CPU kernels. `f32::exp` is a call into libm per element, which
//! keeps every loop around it scalar: it was 7–9% of a CPU LoRA or eval step (the softmax of the
//! cross-entropy alone takes one `exp` per logit). This one is branch-free arithmetic on the
//! float's bits, so the compiler vectorizes the loops that use it, and it stays within 2 ulp of
//! the correctly rounded result.

/// Lanes of the partial sums and maxima in [`sum`] and [`max`]: enough independent
/// accumulators for the compiler to keep a vector register of them.
const LANES: usize = 16;

/// `e^x`: within 2 ulp over the normal range, `0` below `e^-87.3` (and for −∞), +∞ above
/// `e^88.7`, NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const MIN: f32 = -87.336_55;
    const MAX: f32 = 88.722_84;
    // 1.5 · 2²³: adding it rounds a float of magnitude below 2²² to an integer, which then sits
    // in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(MIN, MAX);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    // r = x − n·ln 2 in two parts (Cody–Waite), |r| ≤ ln 2 / 2.
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    // e^r − 1 − r by Cephes' minimax polynomial.
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // y · 2ⁿ as two powers of two, each a normal float for n in [−126, 128].
    let half = ni >> 1;
    let scale = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let e = y * scale(half) * scale(ni - half);
    if x < MIN {
        0.0
    } else if x > MAX {
        f32::INFINITY
    } else {
        e
    }
}

/// `Σ values`, added in [`LANES`] interleaved partial sums (a fixed order: the result is the
/// same on every run).
#[inline]
pub(crate) fn sum(values: &[f32]) -> f32 {
    sum_of(values, |v| v)
}

/// `Σ v²` over `values`, added as [`sum`] adds.
#[inline]
pub(crate) fn sum_squares(values: &[f32]) -> f32 {
    sum_of(values, |v| v * v)
}

/// `Σ f(v)` over `values`, added in [`LANES`] interleaved partial sums.
#[inline(always)]
fn sum_of(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
}

/// The largest of `values` (−∞ for none); NaNs are skipped.
#[inline]
pub(crate) fn max(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `Σ e^(x − shift)` over `row`.
#[inline]
pub(crate) fn sum_exp(row: &[f32], shift: f32) -> f32 {
    sum_of(row, |x| exp(x - shift))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite floats of one sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_normal_range() {
        let mut worst = 0;
        let mut x = -87.3f32;
        while x < 88.7 {
            worst = worst.max(ulps(exp(x), x.exp()));
            x += 0.000_37;
        }
        // The neighbourhood of 0, where r is the whole argument.
        for i in -2000..2000 {
            let x = i as f32 * 1e-6;
            worst = worst.max(ulps(exp(x), x.exp()));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn exp_saturates_outside_the_normal_range() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn reductions_match_the_plain_ones() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for len in [0, 1, 15, 16, 17, 1000] {
            let r = &row[..len];
            let plain_max = r.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max(r), plain_max);
            let plain_sum: f64 = r.iter().map(|&x| x as f64).sum();
            assert!((sum(r) as f64 - plain_sum).abs() <= 1e-4 * plain_sum.abs().max(1.0));
            let plain_squares: f64 = r.iter().map(|&x| x as f64 * x as f64).sum();
            let squares = sum_squares(r) as f64;
            assert!((squares - plain_squares).abs() <= 1e-6 * plain_squares.max(1.0));
            let plain: f64 = r.iter().map(|&x| ((x - 3.0) as f64).exp()).sum();
            let got = sum_exp(r, 3.0) as f64;
            assert!(
                (got - plain).abs() <= 1e-6 * plain.max(1e-30),
                "{got} vs {plain}"
            );
        }
    }
}
