//! The OpenAI routes. Generation (`generate`: chat completions and
//! completions; `responses`: a turn of a stored conversation) goes through
//! admission and the relay; stored objects (`stored`, `conversations`,
//! `responses`' reads, `files`, `batches`) through the store, every access
//! audited. `batch_runner` runs batches' lines through the generation
//! routes, in the batch class.

use std::sync::Arc;

use axum::extract::FromRef;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod batch_runner;
pub mod batches;
pub mod catalog;
pub mod conversations;
pub mod files;
pub mod generate;
pub mod leased;
pub mod models;
pub mod objects;
pub mod responses;
pub mod running;
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
        .routes(routes!(responses::cancel))
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
        .routes(routes!(files::upload, files::list))
        .routes(routes!(files::show, files::delete))
        .routes(routes!(files::content))
        .routes(routes!(batches::create, batches::list))
        .routes(routes!(batches::show))
        .routes(routes!(batches::cancel))
}

/// A batch line's request, through the handler of its endpoint, as
/// `p` (the batch's key, in the batch class): what a client's request to
/// the same route gets, admission and ledger included.
pub(crate) async fn generate_line(
    g: &Arc<generate::Inference>,
    p: Arc<crate::tenancy::principal::Principal>,
    url: &str,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::extract::State;
    use axum::Extension;
    match url {
        "/v1/chat/completions" => {
            generate::chat_completions(State(g.clone()), Extension(p), req).await
        }
        "/v1/completions" => generate::completions(State(g.clone()), Extension(p), req).await,
        "/v1/responses" => responses::create(State(g.clone()), Extension(p), req).await,
        other => axum::response::IntoResponse::into_response(strata_core::ApiError::not_found(
            format!("A batch cannot call `{other}`."),
        )),
    }
}
