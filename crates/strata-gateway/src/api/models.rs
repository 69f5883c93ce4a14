//! `GET /v1/models`: the models of the catalog (whether or not a replica
//! runs), or without one those the ready replicas report, that the
//! caller's key may use.

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};
use strata_core::openai::ModelList;

use crate::api::generate::Inference;
use crate::tenancy::principal::Principal;

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    summary = "List the models this key may use",
    responses((status = 200, description = "OK", body = strata_core::openai::ModelList), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn models(
    State(g): State<Arc<Inference>>,
    Extension(p): Extension<Arc<Principal>>,
) -> Json<ModelList> {
    // With a catalog, its models only (a draining replica of a model just
    // undeployed still reports it); else what ready replicas report.
    // A model kept to another tenant is not listed.
    let served = {
        let catalog = g.models.borrow();
        match catalog.is_empty() {
            true => g.relay.replicas.models(),
            false => catalog
                .iter()
                .filter(|m| m.visible_to(&p.tenant.name))
                .map(|m| m.id.clone())
                .collect(),
        }
    };
    let mut visible = served
        .into_iter()
        .filter(|m| p.key.allows_model(m))
        .collect::<Vec<_>>();
    visible.sort();
    visible.dedup();
    Json(ModelList::of(visible, g.started))
}
