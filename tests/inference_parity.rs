//! Evaluation and generation against transformers on the committed fixtures.

mod common;

use candle_core::{DType, Device};
use common::{fixture, json};
use llmtool::eval::{tokenize, Document, Evaluator, Tally, WindowSpec};
use llmtool::generate::{GenerationSettings, SamplingParams, Session};
use llmtool::model::{self, LoadedModel};

fn tiny_llama() -> LoadedModel {
    model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap()
}

fn eval_text() -> Vec<Document> {
    vec![Document {
        name: "eval.txt".into(),
        text: std::fs::read_to_string(fixture("tiny-llama/eval.txt")).unwrap(),
    }]
}

fn nll(loaded: &LoadedModel, context: usize, stride: usize, batch_size: usize) -> (f64, u64) {
    let evaluator = Evaluator {
        model: &loaded.model,
        spec: WindowSpec::new(context, stride, 128).unwrap(),
        batch_size,
    };
    let mut total = Tally::default();
    for score in evaluator
        .evaluate(&tokenize(&loaded.tokenizer, &eval_text()).unwrap(), |_| {})
        .unwrap()
    {
        total.merge(&score.tally);
    }
    let m = total.metrics().unwrap();
    (m.nll_mean, m.tokens)
}

fn assert_close(got: f64, want: f64) {
    assert!(
        ((got - want) / want).abs() < 1e-5,
        "got {got}, transformers {want}"
    );
}

#[test]
fn single_window_nll_matches_transformers() {
    let expected = &json("tiny-llama/expected.json")["eval"]["single_window"];
    let (mean, tokens) = nll(&tiny_llama(), 128, 64, 4);
    assert_eq!(tokens, expected["tokens_scored"].as_u64().unwrap());
    assert_close(mean, expected["nll_mean"].as_f64().unwrap());
}

#[test]
fn sliding_window_nll_matches_transformers_for_any_batch_size() {
    let expected = &json("tiny-llama/expected.json")["eval"]["sliding_window"];
    let loaded = tiny_llama();
    for batch_size in [1, 3, 8] {
        let (mean, tokens) = nll(&loaded, 32, 16, batch_size);
        assert_eq!(tokens, expected["tokens_scored"].as_u64().unwrap());
        assert_close(mean, expected["nll_mean"].as_f64().unwrap());
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn settings(temperature: f64, max_tokens: usize, seed: u64) -> GenerationSettings {
    GenerationSettings {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k: None,
            top_p: Some(0.9),
            min_p: None,
            repetition_penalty: 1.0,
            seed,
        },
        stop: vec![],
        eos: vec![],
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let expected = &json("tiny-llama/expected.json")["greedy"];
    let loaded = tiny_llama();
    let mut session = Session::new(&loaded.model, &loaded.tokenizer, 64).unwrap();
    let prompt = ids(&expected["prompt_ids"]);
    let out = session
        .generate(&prompt, &settings(0.0, 24, 0), |_| Ok(()))
        .unwrap();
    assert_eq!(out.tokens, ids(&expected["new_ids"]));
    assert_eq!(out.prompt_tokens, prompt.len());
}

#[test]
fn same_seed_same_text_and_cached_prompt_is_reused() {
    let loaded = tiny_llama();
    let mut session = Session::new(&loaded.model, &loaded.tokenizer, 64).unwrap();
    let prompt = session.continuation_ids("The model reads").unwrap();
    let run = |session: &mut Session, seed| {
        session
            .generate(&prompt, &settings(1.0, 20, seed), |_| Ok(()))
            .unwrap()
    };
    let a = run(&mut session, 5);
    let b = run(&mut session, 5);
    let c = run(&mut session, 6);
    assert_eq!(a.text, b.text);
    assert_ne!(a.tokens, c.tokens);
    // A prompt extending what is cached only runs its new tokens.
    let first = session
        .generate(&prompt, &settings(0.0, 5, 0), |_| Ok(()))
        .unwrap();
    let mut longer = prompt.clone();
    longer.extend(&first.tokens[..4]);
    longer.push(first.tokens[4]);
    let second = session
        .generate(&longer, &settings(0.0, 3, 0), |_| Ok(()))
        .unwrap();
    assert_eq!(second.prompt_tokens, 1);
}

fn tiny_llama_with_lora() -> LoadedModel {
    let mut loaded = tiny_llama();
    let adapter = llmtool::train::Adapter::load(
        &fixture("tiny-llama-lora"),
        &loaded.model.config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    adapter.attach(&mut loaded.model).unwrap();
    loaded
}

#[test]
fn peft_adapter_nll_and_greedy_match_peft() {
    let expected = json("tiny-llama-lora/expected.json");
    let loaded = tiny_llama_with_lora();
    let (mean, tokens) = nll(&loaded, 128, 64, 2);
    let single = &expected["eval"]["single_window"];
    assert_eq!(tokens, single["tokens_scored"].as_u64().unwrap());
    assert_close(mean, single["nll_mean"].as_f64().unwrap());
    let mut session = Session::new(&loaded.model, &loaded.tokenizer, 64).unwrap();
    let prompt = ids(&json("tiny-llama/expected.json")["greedy"]["prompt_ids"]);
    let out = session
        .generate(&prompt, &settings(0.0, 24, 0), |_| Ok(()))
        .unwrap();
    assert_eq!(out.tokens, ids(&expected["greedy"]["new_ids"]));
}
