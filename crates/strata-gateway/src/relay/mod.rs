//! From an admitted request to its answer: sent to a replica with retries
//! (`forward`), a streamed answer read once per event (`sse`) and carried
//! across replicas that fail mid-answer (`answer`, `resume`), relayed to
//! the client as it came (`passthrough`) or turned into other events by
//! the route (Responses), kept when asked (`capture`), metered (`ledger`).

pub mod answer;
pub mod capture;
pub mod forward;
pub mod ledger;
pub mod passthrough;
pub mod resume;
pub mod sse;
