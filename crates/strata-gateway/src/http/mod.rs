//! HTTP plumbing every route shares: store failures as OpenAI-shaped
//! errors, JSON and event-stream answers, extractors that answer bad paths
//! and queries with a 400, and the shapes of the OpenAPI document.

pub mod error;
pub mod extract;
pub mod openapi;
