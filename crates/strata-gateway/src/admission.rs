//! What stands between an authenticated request and a replica: role and
//! model access, rate limits, the monthly budget and the fair queue. A
//! `Charge` holds what the request reserved and settles it with the real
//! usage when it is dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_core::config::ModelPrice;
use strata_core::openai::Usage;
use strata_core::store::Store;
use strata_core::tenant::RateLimits;
use strata_core::ApiError;

use crate::auth::Principal;
use crate::budget::{month_start_ms, Budgets};
use crate::fairq::{Admission, FairPermit, FairQueue, Pools, OUTPUT_WEIGHT, PROMPT_WEIGHT};
use crate::limits::{Bucket, Limited, Limiter, Refusal};
use crate::replicas::ReplicaSet;

pub struct Policy {
    pub limiter: Limiter,
    pub budgets: Budgets,
    pub pools: Pools,
    pub replicas: Arc<ReplicaSet>,
    pub slots_per_replica: usize,
    pub pricing: BTreeMap<String, ModelPrice>,
    pub store: Arc<dyn Store>,
    pub queue_timeout: Duration,
    /// Origin of the limiter's clock.
    pub epoch: Instant,
}

/// A request's size as known before it runs.
#[derive(Debug, Clone, Copy)]
pub struct Estimate {
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

impl Estimate {
    fn tokens(&self) -> u64 {
        self.prompt_tokens + self.output_tokens
    }

    fn service(&self) -> f64 {
        self.prompt_tokens as f64 * PROMPT_WEIGHT + self.output_tokens as f64 * OUTPUT_WEIGHT
    }
}

/// The limits that apply to a principal: its key's and its tenant's.
fn limit_buckets(p: &Principal, tokens: u64) -> Vec<(Bucket, u32)> {
    let mut out = Vec::new();
    let mut add = |scope: &str, id: &str, limits: &RateLimits| {
        if let Some(rpm) = limits.requests_per_minute {
            out.push((
                Bucket {
                    name: format!("{scope}:{id}:rpm"),
                    per_minute: rpm,
                    cost: 1,
                },
                rpm,
            ));
        }
        if let Some(tpm) = limits.tokens_per_minute {
            out.push((
                Bucket {
                    name: format!("{scope}:{id}:tpm"),
                    per_minute: tpm,
                    cost: tokens,
                },
                tpm,
            ));
        }
    };
    add("key", &p.key.id, &p.key.limits);
    add("tenant", p.tenant.id.as_str(), &p.tenant.limits);
    out
}

impl Policy {
    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn price(&self, model: &str) -> ModelPrice {
        self.pricing.get(model).copied().unwrap_or_default()
    }

    /// Checks access, limits and budget, then waits for a slot in the fair
    /// queue. The returned `Charge` settles everything when dropped.
    pub async fn admit(
        self: &Arc<Self>,
        p: &Arc<Principal>,
        pool: Option<&str>,
        model: &str,
        estimate: Estimate,
    ) -> Result<Charge, ApiError> {
        if !p.role().may_generate() {
            return Err(ApiError::forbidden(format!(
                "This key's role ({}) may not generate; it can only read.",
                p.role().as_str()
            )));
        }
        if !p.key.allows_model(model) {
            return Err(
                ApiError::forbidden(format!("This key may not use the model `{model}`."))
                    .with_param("model")
                    .with_code("model_not_allowed"),
            );
        }
        let tokens = estimate.tokens();
        let buckets = limit_buckets(p, tokens);
        let to_check: Vec<Bucket> = buckets.iter().map(|(b, _)| b.clone()).collect();
        if let Err(Limited { bucket, refusal }) = self.limiter.check(self.now(), &to_check) {
            let what = if bucket.ends_with(":rpm") {
                "requests"
            } else {
                "tokens"
            };
            let whose = if bucket.starts_with("key:") {
                "key"
            } else {
                "tenant"
            };
            return Err(match refusal {
                Refusal::RetryAfter(secs) => ApiError::rate_limited(
                    format!("Rate limit reached: {what} per minute for this {whose}. Retry after {:.1} s.", secs),
                    secs.ceil() as u64,
                ),
                Refusal::TooLarge => ApiError::rate_limited(
                    format!("This request ({tokens} tokens with max_tokens) is larger than the {whose}'s {what}-per-minute limit; lower max_tokens."),
                    60,
                ),
            });
        }
        let fairq = self.pools.queue(pool, || {
            self.replicas.ready_in(pool) * self.slots_per_replica
        });
        let mut charge = Charge {
            policy: self.clone(),
            fairq: fairq.clone(),
            tenant: p.tenant.id.to_string(),
            buckets: buckets
                .into_iter()
                .filter(|(b, _)| b.name.ends_with(":tpm"))
                .map(|(b, per_minute)| (b.name, per_minute))
                .collect(),
            estimate,
            price: self.price(model),
            budgeted: false,
            permit: None,
            usage: Mutex::new(None),
        };
        if let Some(budget) = p.tenant.monthly_budget_usd {
            let now_ms = crate::now_ms();
            if self.budgets.known(charge.tenant.as_str(), now_ms).is_none() {
                let start = month_start_ms(now_ms);
                let spent = self
                    .store
                    .tenant_spend(&p.tenant.id, start)
                    .await
                    .map_err(crate::admin::store_error)?;
                self.budgets.load(&charge.tenant, start, spent);
            }
            let cost = charge.estimated_cost();
            if let Err(over) = self.budgets.reserve(&charge.tenant, budget, cost) {
                return Err(ApiError::budget_exhausted(format!(
                    "The tenant's monthly budget of ${:.4} is used up (${:.4} spent this month; this request may cost up to ${:.6}).",
                    over.budget, over.spent, cost
                )));
            }
            charge.budgeted = true;
        }
        let permit = match fairq.admit(&charge.tenant, estimate.service()) {
            Err(_) => {
                return Err(ApiError::overloaded(
                    "Too many of this tenant's requests are waiting; retry later.",
                ))
            }
            Ok(Admission::Now(permit)) => permit,
            Ok(Admission::Wait(rx)) => match tokio::time::timeout(self.queue_timeout, rx).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(ApiError::unavailable("The gateway is shutting down.")),
                Err(_) => {
                    return Err(ApiError::overloaded(
                        "The replicas stayed saturated while this request waited; retry later.",
                    ))
                }
            },
        };
        charge.permit = Some(permit);
        Ok(charge)
    }
}

/// What one admitted request holds: its fair-queue slot and its reserved
/// tokens and dollars. Dropping it settles all three with the recorded usage
/// (none recorded: nothing was generated).
pub struct Charge {
    policy: Arc<Policy>,
    fairq: Arc<FairQueue>,
    tenant: String,
    /// Token buckets to correct: name and rate.
    buckets: Vec<(String, u32)>,
    estimate: Estimate,
    price: ModelPrice,
    budgeted: bool,
    permit: Option<FairPermit>,
    usage: Mutex<Option<Usage>>,
}

impl Charge {
    fn estimated_cost(&self) -> f64 {
        self.price
            .cost(self.estimate.prompt_tokens, self.estimate.output_tokens)
    }

    /// Dollars for `usage` at this model's price.
    pub fn cost(&self, usage: &Usage) -> f64 {
        self.price.cost(
            u64::from(usage.prompt_tokens),
            u64::from(usage.completion_tokens),
        )
    }

    pub fn record(&self, usage: Usage) {
        *self.usage.lock().expect("charge lock") = Some(usage);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let usage = self
            .usage
            .lock()
            .expect("charge lock")
            .take()
            .unwrap_or_default();
        let actual_tokens = u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens);
        let delta = actual_tokens as i64 - self.estimate.tokens() as i64;
        for (name, per_minute) in &self.buckets {
            self.policy.limiter.adjust(name, *per_minute, delta);
        }
        if self.budgeted {
            let actual = self.cost(&usage);
            self.policy
                .budgets
                .settle(&self.tenant, self.estimated_cost(), actual);
        }
        // Only a request that got a slot was charged to the fair queue; one
        // refused on the way (budget, full queue, timeout) has nothing to settle.
        if let Some(permit) = self.permit.take() {
            let service = f64::from(usage.prompt_tokens) * PROMPT_WEIGHT
                + f64::from(usage.completion_tokens) * OUTPUT_WEIGHT;
            self.fairq
                .settle(&self.tenant, service - self.estimate.service());
            // The slot goes back last, so the next tenant is picked on corrected counters.
            drop(permit);
        }
    }
}
