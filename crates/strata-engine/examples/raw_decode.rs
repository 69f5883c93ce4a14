//! Raw llama.cpp throughput on the benchmark's workload, without strata's
//! scheduler or HTTP: N prompts prefilled together, then 64 greedy decode
//! steps of N tokens each. The baseline `bench/engine_bench.py` compares with.
//!
//! `cargo run --release -p strata-engine --example raw_decode -- MODEL THREADS N...`

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use strata_engine::argmax;

const TOKENS: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (model_path, threads) = (&args[1], args[2].parse::<i32>()?);
    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, model_path, &LlamaModelParams::default())?;
    for n in args[3..].iter().map(|a| a.parse::<usize>()) {
        let n = n?;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(8192))
            .with_n_batch(512)
            .with_n_ubatch(512)
            .with_n_seq_max(n as u32)
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let mut ctx = model.new_context(&backend, params)?;
        let mut batch = LlamaBatch::new(512, n as i32);
        let start = Instant::now();
        let mut last = Vec::new();
        let mut pos = Vec::new();
        // Batch index of each sequence's last prompt token, whose logits we sample.
        let mut idx = Vec::new();
        for s in 0..n {
            let prompt = format!("Story {s}: The history of cloud computing began");
            let tokens = model.vocab().tokenize(prompt.as_bytes(), true, false);
            for (k, &t) in tokens.iter().enumerate() {
                batch.add(t, k as i32, &[s as i32], k + 1 == tokens.len())?;
            }
            pos.push(tokens.len() as i32);
            idx.push(batch.n_tokens() - 1);
        }
        ctx.decode(&mut batch)?;
        for &i in &idx {
            last.push(argmax(ctx.get_logits_ith(i)));
        }
        for _ in 1..TOKENS {
            batch.clear();
            for s in 0..n {
                batch.add(last[s], pos[s], &[s as i32], true)?;
                pos[s] += 1;
            }
            ctx.decode(&mut batch)?;
            for (s, token) in last.iter_mut().enumerate() {
                *token = argmax(ctx.get_logits_ith(s as i32));
            }
        }
        let wall = start.elapsed().as_secs_f64();
        println!(
            "streams={n} tokens={} wall={wall:.2}s aggregate={:.1}/s",
            n * TOKENS,
            (n * TOKENS) as f64 / wall
        );
    }
    Ok(())
}
