//! What can stop an engine from starting or serving.

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
