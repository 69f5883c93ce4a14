//! Who is asking and whether their request may run now: API keys become
//! principals (`auth`, `keys`), every access is audited (`audit`), and
//! admission (`admission`) holds a generation request to its key's and
//! tenant's rate limits (`limits`, `shared_limits`), its tenant's monthly
//! budget (`budget`) and its share of the replicas (`fairq`); a tenant
//! follows at most so many background responses' streams (`followers`).

pub mod admission;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod fairq;
pub mod followers;
pub mod keys;
pub mod limits;
pub mod principal;
pub mod shared_limits;

/// A map looked up on every request (limits, budgets, keys, the fair
/// queue's counters): foldhash instead of SipHash, which was ~3% of a
/// proxied request's instructions. Its keys are strata's own ids and
/// digests, not text a client chooses.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
