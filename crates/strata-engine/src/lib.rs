//! The embedded engine: llama.cpp (through `llama-cpp-2`) with continuous
//! batching over many sequences, and its OpenAI-compatible HTTP server.
//! The only crate that builds C++.

pub mod batch;
pub mod engine;
pub mod error;
pub mod linger;
pub mod metrics;
pub mod prefix;
pub mod server;
pub mod stop;

pub use engine::{
    argmax, default_threads, model_name_for, CacheTag, Class, Engine, EngineSettings, Event,
    Submitted,
};
pub use error::EngineError;
