//! The OpenAI routes. Generation (`generate`: chat completions and
//! completions; `responses`: a turn of a stored conversation) goes through
//! admission and the relay; stored objects (`stored`, `conversations`,
//! `responses`' reads) through the store, every access audited.

use std::sync::Arc;

use axum::extract::FromRef;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod catalog;
pub mod conversations;
pub mod generate;
pub mod models;
pub mod objects;
pub mod responses;
pub mod stored;

/// The OpenAI routes, for a router whose state holds the generation and
/// stored-object states.
pub fn routes<S>() -> OpenApiRouter<S>
where
    Arc<generate::Inference>: FromRef<S>,
    Arc<objects::Objects>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    OpenApiRouter::new()
        .routes(routes!(generate::completions))
        .routes(routes!(
            generate::chat_completions,
            stored::list_completions
        ))
        .routes(routes!(models::models))
        .routes(routes!(responses::create))
        .routes(routes!(responses::show, responses::delete))
        .routes(routes!(responses::input_items))
        .routes(routes!(conversations::create))
        .routes(routes!(
            conversations::show,
            conversations::update,
            conversations::delete
        ))
        .routes(routes!(conversations::list_items, conversations::add_items))
        .routes(routes!(
            conversations::show_item,
            conversations::delete_item
        ))
        .routes(routes!(stored::show, stored::update, stored::delete))
        .routes(routes!(stored::messages))
}
