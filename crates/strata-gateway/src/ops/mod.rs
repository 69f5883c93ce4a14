//! The operators' routes beside the API: the admin API (`admin`, and the
//! model catalog in `models`), the dashboard (`dashboard`), and health,
//! metrics and the OpenAPI document (`status`).

pub mod admin;
pub mod dashboard;
pub mod models;
pub mod status;
