//! The authenticated caller: its key, its role and its tenant, and what
//! that lets it do.

use strata_core::tenant::{ApiKeyRecord, Isolation, Role, Tenant};
use strata_core::ApiError;

use crate::tenancy::fairq::Class;

/// The authenticated caller, in the request's extensions.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: ApiKeyRecord,
    pub tenant: Tenant,
    /// Whose turn comes first for a slot: a client's request is
    /// interactive; a batch's line runs as its key, in the batch class.
    pub class: Class,
}

impl Principal {
    pub fn role(&self) -> Role {
        self.key.role
    }

    /// The replica pool the tenant's requests go to: its own (by name) when
    /// it is `dedicated`, else the shared one (`None`).
    pub fn pool(&self) -> Option<&str> {
        (self.tenant.isolation == Isolation::Dedicated).then_some(self.tenant.name.as_str())
    }

    /// An admin of the platform tenant: sees and manages every tenant.
    pub fn is_platform_admin(&self) -> bool {
        self.key.role == Role::Admin && self.tenant.id.is_platform()
    }

    /// Readers may look at their stored objects but not change or delete
    /// them (`what`: "delete stored responses").
    pub fn may_change(&self, what: &str) -> Result<(), ApiError> {
        if self.role().may_generate() {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "This key's role ({}) may not {what}.",
                self.role().as_str()
            )))
        }
    }
}
