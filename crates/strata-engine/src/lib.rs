//! The embedded engine: llama.cpp (through `llama-cpp-2`) with continuous
//! batching over many sequences, and its OpenAI-compatible HTTP server.
//! The only crate that builds C++.

pub mod batch;
pub mod engine;
pub mod metrics;
pub mod prefix;
pub mod server;
pub mod stop;

pub use engine::{
    argmax, default_threads, model_name_for, CacheTag, Engine, EngineSettings, Event, Submitted,
};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {0} does not exist; run `strata model fetch` or pass --model")]
    ModelMissing(PathBuf),
    #[error("cannot load model {0}: {1}")]
    ModelLoad(PathBuf, String),
    #[error("cannot create the llama.cpp context: {0}")]
    Context(String),
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}
