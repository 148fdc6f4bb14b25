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
    // Below MIN the result is 0, and e is computed from 0 there: from x itself the scaling
    // below would underflow into subnormals, a microcode assist per element (a 128K-token
    // softmax with half its exponents below MIN took five times as long).
    let below = x < MIN;
    let xc = if below { 0.0 } else { x.clamp(MIN, MAX) };
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
    if x > MAX {
        f32::INFINITY
    } else {
        // 0 below MIN as a product rather than a choice: with a choice the compiler drops
        // xc's 0 (the lane's e is unused) and computes e from x.
        e * if below { 0.0 } else { 1.0 }
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

/// The softmax of `row · scale` in place, for `scale` > 0: each element becomes
/// `e^(x · scale − max · scale)` (the largest of the products is the product of the largest)
/// times the reciprocal of their sum (added in 16 interleaved partial sums), or 0 where that
/// would be below the least normal float: a product into the subnormal range costs the CPU a
/// microcode assist (a peaked 128K vocabulary's row took twice as long), and no draw can land
/// on so small a weight. A row with a NaN, or with no finite maximum, becomes NaN. The sampler's
/// probabilities (`scale` = 1 / temperature) and the CPU attention's soft-capped scores take
/// it.
pub fn softmax_in_place(row: &mut [f32], scale: f32) {
    let shift = max(row) * scale;
    row.iter_mut().for_each(|x| *x = exp(*x * scale - shift));
    let sum = sum(row);
    let (inv, least) = (1.0 / sum, f32::MIN_POSITIVE * sum);
    row.iter_mut().for_each(|x| {
        let kept = if *x < least { 0.0 } else { *x };
        *x = kept * inv;
    });
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

    /// The softmax against the composite reference (candle's scaling, max, exp, sum and
    /// division) at a sampler's vocabulary and temperatures, flat to peaked rows. The two
    /// normalize by sums added in other orders: their ratio, read at the largest logit (whose
    /// exponential is 1 on both sides), is within 1e-5 of 1. Each probability, that ratio
    /// taken out, is within 4 units of f32's epsilon relative to the reference's where that is
    /// at least 1e-37 (the exponentials are within 2 ulp, the products and the division round
    /// once each) plus one for each unit of the exponent's magnitude (the scaled logit, rounded
    /// by each side its own way, moves e^a by a's absolute error); elsewhere within 1e-37
    /// (probabilities below the least normal float are 0).
    #[test]
    fn softmax_in_place_matches_the_reference() {
        use candle_core::{Device, Tensor, D};
        for (len, spread) in [
            (1, 1.0),
            (17, 3.0),
            (1000, 0.5),
            (128_256, 20.0),
            (128_256, 150.0),
        ] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * spread)
                .collect();
            for temperature in [0.3f64, 0.8, 1.0, 2.0] {
                let scale = (1.0 / temperature) as f32;
                let shift = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale;
                let mut got = row.clone();
                softmax_in_place(&mut got, scale);
                let tempered =
                    (Tensor::new(row.as_slice(), &Device::Cpu).unwrap() / temperature).unwrap();
                let want = crate::reference::softmax(&tempered, D::Minus1)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let top = (0..len).find(|&i| row[i] * scale == shift).unwrap();
                let sums = got[top] / want[top];
                assert!(
                    (sums - 1.0).abs() <= 1e-5,
                    "len {len}, t {temperature}: {sums}"
                );
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    let exponent = (row[i] * scale - shift).abs();
                    let close = if w >= 1e-37 {
                        (g / sums - w).abs() <= w * f32::EPSILON * (4.0 + exponent)
                    } else {
                        (g - w).abs() <= 1e-37
                    };
                    assert!(
                        close,
                        "len {len}, spread {spread}, t {temperature}, {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_in_place_of_a_row_without_a_finite_maximum_is_nan() {
        for row in [
            vec![f32::NEG_INFINITY; 3],
            vec![0.0, f32::NAN, 1.0],
            vec![0.0, f32::INFINITY],
        ] {
            let mut row = row;
            softmax_in_place(&mut row, 1.0);
            assert!(row.iter().all(|p| p.is_nan()), "{row:?}");
        }
        let mut empty: [f32; 0] = [];
        softmax_in_place(&mut empty, 1.0);
    }
}
