//! The replicas as the gateway sees them: their endpoints and readiness
//! (`replicas`, `health`), which one takes a request (`pick`, the pure
//! policy, with `prefix_index`), how requests reach them (`client`), and
//! what moves between them when one leaves (`snapshots`, `drains`).

pub mod client;
pub mod drains;
pub mod health;
pub mod pick;
pub mod prefix_index;
pub mod replicas;
pub mod snapshots;
