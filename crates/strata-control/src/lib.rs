//! The controller side of strata: the pool controller (`controller`), the
//! autoscaling policy, the instance planner, providers that launch and
//! supervise engine replicas (`provider`: `local` child processes on this
//! machine, `sim` a simulated cloud), the cost ledger, and the simulator
//! that replays traces against the policies (`simulate`).

pub mod autoscale;
pub mod cluster;
pub mod controller;
pub mod cost;
pub mod leader;
pub mod metrics;
pub mod planner;
pub mod provider;
pub mod simulate;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A data file (a trace) that does not read as its format.
    #[error("{0}")]
    BadData(String),
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
