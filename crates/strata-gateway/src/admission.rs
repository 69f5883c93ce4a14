//! What stands between an authenticated request and a replica: role and
//! model access, rate limits, the monthly budget and the fair queue. A
//! `Charge` holds what the request reserved and settles it with the real
//! usage when it is dropped.

use std::collections::BTreeMap;
use std::sync::Arc;
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
use crate::metrics::GatewayMetrics;
use crate::replicas::ReplicaSet;
use crate::shared_limits::SharedLimiter;

pub struct Policy {
    pub limiter: Limiter,
    /// Limits kept in Redis for every gateway of a cluster; `limiter` is
    /// used when there is none or it cannot be reached.
    pub shared_limits: Option<SharedLimiter>,
    pub budgets: Budgets,
    /// Where several gateways spend from one budget: how old a tenant's
    /// month spend (read from the shared ledger) may get before it is read
    /// again. `None`: this gateway is the only one, its own count is exact.
    pub budget_refresh: Option<Duration>,
    pub metrics: Arc<GatewayMetrics>,
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

impl From<Usage> for Estimate {
    /// The size a request turned out to have.
    fn from(u: Usage) -> Estimate {
        Estimate {
            prompt_tokens: u64::from(u.prompt_tokens),
            output_tokens: u64::from(u.completion_tokens),
        }
    }
}

/// The limits that apply to a principal: its key's and its tenant's.
fn limit_buckets(p: &Principal, tokens: u64) -> Vec<Bucket> {
    let mut out = Vec::new();
    let mut add = |scope: &str, id: &str, limits: &RateLimits| {
        if let Some(rpm) = limits.requests_per_minute {
            out.push(Bucket {
                // Per request: joined, not formatted.
                name: [scope, ":", id, ":rpm"].concat(),
                per_minute: rpm,
                cost: 1,
            });
        }
        if let Some(tpm) = limits.tokens_per_minute {
            out.push(Bucket {
                name: [scope, ":", id, ":tpm"].concat(),
                per_minute: tpm,
                cost: tokens,
            });
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

    /// Checks the buckets in Redis when limits are shared, else (or when
    /// Redis fails) here; the bool says Redis admitted it.
    async fn check_limits(&self, buckets: &[Bucket]) -> (Result<(), Limited>, bool) {
        if let Some(shared) = &self.shared_limits {
            match shared.check(buckets).await {
                Ok(verdict) => return (verdict, true),
                Err(e) => {
                    self.metrics.limits_fallback.inc();
                    tracing::warn!(error = %e, "shared rate limits unreachable; limiting on this gateway alone");
                }
            }
        }
        (self.limiter.check(self.now(), buckets), false)
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
        let (verdict, shared) = self.check_limits(&buckets).await;
        if let Err(Limited { bucket, refusal }) = verdict {
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
                .filter(|b| b.name.ends_with(":tpm"))
                .collect(),
            estimate,
            price: self.price(model),
            budgeted: false,
            shared,
            permit: None,
            usage: None,
        };
        if let Some(budget) = p.tenant.monthly_budget_usd {
            let now_ms = crate::now_ms();
            if self
                .budgets
                .needs_read(&charge.tenant, now_ms, self.budget_refresh)
            {
                let start = month_start_ms(now_ms);
                let spent = self
                    .store
                    .tenant_spend(&p.tenant.id, start)
                    .await
                    .map_err(crate::admin::store_error)?;
                self.budgets.load(&charge.tenant, start, spent, now_ms);
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
    /// Token buckets to correct with the real size.
    buckets: Vec<Bucket>,
    estimate: Estimate,
    price: ModelPrice,
    budgeted: bool,
    /// The limits were checked in Redis (so they are settled there).
    shared: bool,
    permit: Option<FairPermit>,
    usage: Option<Usage>,
}

impl Charge {
    fn cost_of(&self, size: Estimate) -> f64 {
        self.price.cost(size.prompt_tokens, size.output_tokens)
    }

    fn estimated_cost(&self) -> f64 {
        self.cost_of(self.estimate)
    }

    /// Records what the request really used (settled when the charge drops)
    /// and returns its price in dollars.
    pub fn record(&mut self, usage: Usage) -> f64 {
        self.usage = Some(usage);
        self.cost_of(usage.into())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let used = Estimate::from(self.usage.take().unwrap_or_default());
        let delta = used.tokens() as i64 - self.estimate.tokens() as i64;
        match (&self.policy.shared_limits, self.shared) {
            (Some(shared), true) if delta != 0 => {
                let (shared, buckets) = (shared.clone(), std::mem::take(&mut self.buckets));
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        for b in buckets {
                            if let Err(e) = shared.adjust(&b.name, b.per_minute, delta).await {
                                tracing::warn!(error = %e, bucket = %b.name, "shared rate limit not settled");
                            }
                        }
                    });
                }
            }
            _ => {
                for b in &self.buckets {
                    self.policy.limiter.adjust(&b.name, b.per_minute, delta);
                }
            }
        }
        if self.budgeted {
            let (estimated, actual) = (self.estimated_cost(), self.cost_of(used));
            self.policy.budgets.settle(&self.tenant, estimated, actual);
        }
        // Only a request that got a slot was charged to the fair queue; one
        // refused on the way (budget, full queue, timeout) has nothing to settle.
        if let Some(permit) = self.permit.take() {
            self.fairq
                .settle(&self.tenant, used.service() - self.estimate.service());
            // The slot goes back last, so the next tenant is picked on corrected counters.
            drop(permit);
        }
    }
}
