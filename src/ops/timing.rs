//! Per-op timing of fused kernels against their references at the `tiny` bench preset's shapes
//! (batch 8 × 256, 6 heads of 64, hidden 384, ffn 1024, vocab 8192). Ignored by default; run
//! `cargo test --release --lib op_timing -- --ignored --nocapture`. It prints, never asserts.

use super::parity::uniform;
use super::{reference, Tensor};
use candle_core::{Device, Result, Var};
use std::time::Instant;

type Op = fn(&[Tensor]) -> Result<Tensor>;

/// Best of three: forward plus backward through a sum of the output, in milliseconds.
fn millis(op: Op, inputs: &[Tensor]) -> f64 {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).expect("copy"))
        .collect();
    let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let y = op(&args).expect("op runs");
            y.sum_all().and_then(|s| s.backward()).expect("backward");
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
#[ignore = "timing, not a check: run explicitly in release"]
fn op_timing() {
    let ids = |n: usize| {
        Tensor::new(
            (0..n as u32).map(|i| i * 7 % 8192).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap()
    };
    let angles = uniform(&[256, 32], 5);
    let cases: Vec<(&str, Op, Op, Vec<Tensor>)> = vec![
        (
            "causal_attention",
            |t| super::causal_attention(&t[0], &t[1], &t[2]),
            |t| reference::causal_attention(&t[0], &t[1], &t[2]),
            (0..3).map(|s| uniform(&[8, 6, 256, 64], s)).collect(),
        ),
        (
            "masked_mean_nll",
            |t| {
                super::masked_mean_nll(
                    &t[0],
                    &t[1].to_dtype(candle_core::DType::U32)?,
                    &t[2].ones_like()?,
                )
            },
            |t| {
                reference::masked_mean_nll(
                    &t[0],
                    &t[1].to_dtype(candle_core::DType::U32)?,
                    &t[2].ones_like()?,
                )
            },
            vec![
                uniform(&[2048, 8192], 1),
                ids(2048).to_dtype(candle_core::DType::F32).unwrap(),
                uniform(&[2048], 2),
            ],
        ),
        (
            "rms_norm",
            |t| super::rms_norm(&t[0], &t[1], 1e-6),
            |t| reference::rms_norm(&t[0], &t[1], 1e-6),
            vec![uniform(&[8, 256, 384], 1), uniform(&[384], 2)],
        ),
        (
            "rope",
            |t| super::rope(&t[0], &t[1], &t[2]),
            |t| reference::rope(&t[0], &t[1], &t[2]),
            vec![
                uniform(&[8, 6, 256, 64], 1),
                angles.cos().unwrap(),
                angles.sin().unwrap(),
            ],
        ),
        (
            "swiglu",
            |t| super::swiglu(&t[0], &t[1]),
            |t| reference::swiglu(&t[0], &t[1]),
            vec![uniform(&[8, 256, 1024], 1), uniform(&[8, 256, 1024], 2)],
        ),
    ];
    for (name, fused, composite, inputs) in cases {
        let (f, c) = (millis(fused, &inputs), millis(composite, &inputs));
        println!(
            "{name:18} fwd+bwd: fused {f:8.1} ms, composite {c:8.1} ms, {:.1}x",
            c / f
        );
    }
}
