//! What stands between an authenticated request and a replica: role and
//! model access, rate limits, the monthly budget and the fair queue.
//!
//! The policy is `decide`, a pure function over a `Snapshot` of what is
//! known about the request so far: it answers with a refusal, an admission,
//! or the one thing it needs to know next (the limits' verdict, a budget
//! reservation, a fair-queue slot). `Gate` is the I/O shell around it: it
//! asks the limiter (or Redis), reads the month's spend from the ledger,
//! waits in the queue, and calls `decide` again with each answer. What a
//! request reserved is held in a `Charge`, settled with the real usage when
//! it drops.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_core::config::ModelPrice;
use strata_core::openai::Usage;
use strata_core::store::UsageStore;
use strata_core::tenant::{RateLimits, Role};
use strata_core::ApiError;

use crate::http::error::store_error;
use crate::metrics::GatewayMetrics;
use crate::tenancy::budget::{Budgets, OverBudget};
use crate::tenancy::fairq::{
    Admission, Class, FairPermit, FairQueue, NoSlot, Pools, OUTPUT_WEIGHT, PROMPT_WEIGHT,
};
use crate::tenancy::limits::{Bucket, Limited, Limiter, Refusal};
use crate::tenancy::principal::Principal;
use crate::tenancy::shared_limits::SharedLimiter;

/// A request's size as known before it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

impl Estimate {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.output_tokens
    }

    /// Its weight in the fair queue's counters.
    pub fn service(&self) -> f64 {
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

/// How a wait for a fair-queue slot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Granted,
    /// The tenant already has as many requests waiting as it may.
    QueueFull,
    /// A sheddable request found the replicas full: refused, not queued.
    Shed,
    /// The replicas stayed saturated for the whole queue timeout.
    TimedOut,
    /// The queue went away (the gateway is stopping).
    Closed,
}

/// What admission knows about one request. The fields after `cost` start
/// as `None` and are filled in by the shell as `decide` asks for them.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    pub role: Role,
    pub model: &'a str,
    /// The key may use `model`.
    pub model_allowed: bool,
    pub estimate: Estimate,
    /// The tenant's monthly budget in dollars, if it has one.
    pub budget: Option<f64>,
    /// What the request may cost at most.
    pub cost: f64,
    /// The rate limiter's verdict on every bucket of the request at once.
    pub limits: Option<Result<(), Limited>>,
    /// Whether `cost` fit the tenant's month next to what is spent and
    /// reserved (only asked when there is a budget).
    pub reservation: Option<Result<(), OverBudget>>,
    pub slot: Option<Slot>,
}

/// What `decide` says about a `Snapshot`.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Refuse(ApiError),
    /// Ask the rate limiter about the request's buckets.
    CheckLimits,
    /// Reserve `cost` against the tenant's monthly `budget`.
    Reserve {
        budget: f64,
        cost: f64,
    },
    /// Wait for a slot in the fair queue, counting `service`.
    Queue {
        service: f64,
    },
    Admit,
}

/// What a refused sheddable request is told to wait before it retries.
pub const SHED_RETRY_AFTER_SECS: u64 = 2;

/// The admission policy. Checks run in a fixed order, and each refuses
/// before the next is asked: access (nothing is counted for a request its
/// key may not make), rate limits, budget, fair-queue slot.
pub fn decide(s: &Snapshot) -> Decision {
    if !s.role.may_generate() {
        return Decision::Refuse(ApiError::forbidden(format!(
            "This key's role ({}) may not generate; it can only read.",
            s.role.as_str()
        )));
    }
    // A model the key may not use is, to it, a model that does not exist:
    // the same 404, so no key learns what else the platform serves.
    if !s.model_allowed {
        return Decision::Refuse(ApiError::model_not_found(s.model));
    }
    match &s.limits {
        None => return Decision::CheckLimits,
        Some(Err(limited)) => return Decision::Refuse(rate_limited(limited, s.estimate.tokens())),
        Some(Ok(())) => {}
    }
    if let Some(budget) = s.budget {
        match &s.reservation {
            None => {
                return Decision::Reserve {
                    budget,
                    cost: s.cost,
                }
            }
            Some(Err(over)) => return Decision::Refuse(over_budget(over, s.cost)),
            Some(Ok(())) => {}
        }
    }
    match s.slot {
        None => Decision::Queue {
            service: s.estimate.service(),
        },
        Some(Slot::Granted) => Decision::Admit,
        Some(Slot::QueueFull) => Decision::Refuse(ApiError::overloaded(
            "Too many of this tenant's requests are waiting; retry later.",
        )),
        Some(Slot::Shed) => Decision::Refuse(
            ApiError::unavailable(
                "The replicas are busy and this key's requests are sheddable: they are refused \
                 first under load; retry later.",
            )
            .with_code("sheddable_refused")
            .with_retry_after(SHED_RETRY_AFTER_SECS),
        ),
        Some(Slot::TimedOut) => Decision::Refuse(ApiError::overloaded(
            "The replicas stayed saturated while this request waited; retry later.",
        )),
        Some(Slot::Closed) => {
            Decision::Refuse(ApiError::unavailable("The gateway is shutting down."))
        }
    }
}

fn rate_limited(limited: &Limited, tokens: u64) -> ApiError {
    let bucket = &limited.bucket;
    let what = if bucket.ends_with(":rpm") {
        "requests"
    } else if bucket.ends_with(":batch_tpm") {
        "batch tokens"
    } else {
        "tokens"
    };
    let whose = if bucket.starts_with("key:") {
        "key"
    } else {
        "tenant"
    };
    match limited.refusal {
        Refusal::RetryAfter(secs) => ApiError::rate_limited(
            format!("Rate limit reached: {what} per minute for this {whose}. Retry after {secs:.1} s."),
            secs.ceil() as u64,
        ),
        // A batch line larger than its whole batch allowance would wait
        // out its window for nothing: it fails now, into the error file.
        Refusal::TooLarge if bucket.ends_with(":batch_tpm") => ApiError::invalid_request(
            Some("max_tokens"),
            format!("This line ({tokens} tokens with max_tokens) is larger than the {whose}'s {what}-per-minute limit; lower max_tokens."),
        ),
        Refusal::TooLarge => ApiError::rate_limited(
            format!("This request ({tokens} tokens with max_tokens) is larger than the {whose}'s {what}-per-minute limit; lower max_tokens."),
            60,
        ),
    }
}

fn over_budget(over: &OverBudget, cost: f64) -> ApiError {
    ApiError::budget_exhausted(format!(
        "The tenant's monthly budget of ${:.4} is used up (${:.4} spent this month; this request may cost up to ${:.6}).",
        over.budget, over.spent, cost
    ))
}

/// The limits that apply to a principal: its key's and its tenant's. A
/// batch line counts against a scope's batch token limit where it has one
/// (and then against nothing else of that scope), else against its
/// interactive limits like any request.
pub fn limit_buckets(p: &Principal, tokens: u64) -> Vec<Bucket> {
    let mut out = Vec::new();
    let mut add = |scope: &str, id: &str, limits: &RateLimits| {
        if let (Class::Batch, Some(tpm)) = (p.class, limits.batch_tokens_per_minute) {
            out.push(Bucket {
                name: [scope, ":", id, ":batch_tpm"].concat(),
                per_minute: tpm,
                cost: tokens,
            });
            return;
        }
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

/// How admission is set up.
#[derive(Debug, Clone)]
pub struct GateSettings {
    /// Requests a replica takes at once; a pool's queue has ready replicas
    /// × this many slots.
    pub slots_per_replica: usize,
    pub max_waiting_per_tenant: usize,
    /// Longest wait for a slot.
    pub queue_timeout: Duration,
    /// Dollars per million tokens by model, for budgets.
    pub pricing: BTreeMap<String, ModelPrice>,
    /// What a batch line's tokens cost over the same tokens asked for
    /// interactively (0.5: half price).
    pub batch_price_factor: f64,
    /// Share of each pool's slots kept for batch lines that wait.
    pub batch_reserved_share: f64,
    /// Where several gateways spend from one budget: how old a tenant's
    /// month spend (read from the shared ledger) may get before it is read
    /// again. `None`: this gateway is the only one, its own count is exact.
    pub budget_refresh: Option<Duration>,
}

/// The I/O around `decide`: the limiters, the ledger's month spend, the
/// fair queues.
pub struct Gate {
    settings: GateSettings,
    limiter: Limiter,
    /// Limits kept in Redis for every gateway of a cluster; `limiter` is
    /// used when there is none or it cannot be reached.
    shared_limits: Option<SharedLimiter>,
    budgets: Budgets,
    pools: Pools,
    spend: Arc<dyn UsageStore>,
    metrics: Arc<GatewayMetrics>,
    /// Origin of the limiter's clock.
    epoch: Instant,
}

impl Gate {
    /// `spend` is the ledger the tenants' month spend is read from.
    pub fn new(
        settings: GateSettings,
        spend: Arc<dyn UsageStore>,
        shared_limits: Option<SharedLimiter>,
        metrics: Arc<GatewayMetrics>,
    ) -> Arc<Gate> {
        Arc::new(Gate {
            pools: Pools::new(
                settings.max_waiting_per_tenant,
                settings.batch_reserved_share,
            ),
            settings,
            limiter: Limiter::default(),
            shared_limits,
            budgets: Budgets::default(),
            spend,
            metrics,
            epoch: Instant::now(),
        })
    }

    /// The fair queues, one per replica pool.
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    pub fn slots_per_replica(&self) -> usize {
        self.settings.slots_per_replica
    }

    /// The price of `model`'s tokens to a request of `class`.
    pub(crate) fn price(&self, model: &str, class: Class) -> ModelPrice {
        let list = self
            .settings
            .pricing
            .get(model)
            .copied()
            .unwrap_or_default();
        match class {
            Class::Interactive | Class::Sheddable => list,
            Class::Batch => ModelPrice {
                prompt_per_million: list.prompt_per_million * self.settings.batch_price_factor,
                completion_per_million: list.completion_per_million
                    * self.settings.batch_price_factor,
            },
        }
    }

    /// Checks the buckets in Redis when limits are shared, else (or when
    /// Redis fails) here; the bool says Redis ruled.
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
        let now = self.epoch.elapsed().as_secs_f64();
        (self.limiter.check(now, buckets), false)
    }

    /// Reserves `cost` against the tenant's month, reading its spend from
    /// the ledger first when this gateway does not know it (or, shared with
    /// others, knows it from too long ago).
    async fn reserve(
        &self,
        p: &Principal,
        budget: f64,
        cost: f64,
    ) -> Result<Result<(), OverBudget>, ApiError> {
        let tenant = p.tenant.id.as_str();
        let now_ms = strata_core::now_ms();
        if self
            .budgets
            .needs_read(tenant, now_ms, self.settings.budget_refresh)
        {
            let start = strata_core::calendar::month_start_ms(now_ms);
            let spent = self
                .spend
                .tenant_spend(&p.tenant.id, start)
                .await
                .map_err(store_error)?;
            self.budgets.load(tenant, start, spent, now_ms);
        }
        Ok(self.budgets.reserve(tenant, budget, cost))
    }

    /// Admits `p`'s request for `model` (asked for as `asked`: the model,
    /// or an alias for it) of `estimate`'s size to the pool of its tenant
    /// (the model's own, where `lane` names it), which has `routable`
    /// replicas now; waits for a slot in the pool's fair queue. The
    /// `Charge` settles everything when dropped.
    pub async fn admit(
        self: &Arc<Self>,
        p: &Arc<Principal>,
        routable: usize,
        asked: &str,
        model: &str,
        lane: Option<&str>,
        estimate: Estimate,
    ) -> Result<Charge, ApiError> {
        let price = self.price(model, p.class);
        let mut snapshot = Snapshot {
            role: p.role(),
            model: asked,
            model_allowed: p.key.allows_model(asked),
            estimate,
            budget: p.tenant.monthly_budget_usd,
            cost: price.cost(estimate.prompt_tokens, estimate.output_tokens),
            limits: None,
            reservation: None,
            slot: None,
        };
        // Made once the limits have counted the request, so that whatever
        // refuses it later gives back what they took.
        let mut charge: Option<Charge> = None;
        loop {
            match decide(&snapshot) {
                Decision::Refuse(e) => return Err(e),
                Decision::Admit => return Ok(charge.expect("admitted after the limits")),
                Decision::CheckLimits => {
                    let buckets = limit_buckets(p, estimate.tokens());
                    let (verdict, shared) = self.check_limits(&buckets).await;
                    if verdict.is_ok() {
                        charge = Some(Charge {
                            gate: self.clone(),
                            fairq: None,
                            tenant: p.tenant.id.to_string(),
                            buckets: buckets
                                .into_iter()
                                .filter(|b| b.name.ends_with("tpm"))
                                .collect(),
                            estimate,
                            price,
                            budgeted: false,
                            shared,
                            permit: None,
                            usage: None,
                            class: p.class,
                        });
                    }
                    snapshot.limits = Some(verdict);
                }
                Decision::Reserve { budget, cost } => {
                    let reserved = self.reserve(p, budget, cost).await?;
                    if let (Ok(()), Some(c)) = (&reserved, charge.as_mut()) {
                        c.budgeted = true;
                    }
                    snapshot.reservation = Some(reserved);
                }
                Decision::Queue { service } => {
                    let c = charge.as_mut().expect("queued after the limits");
                    let pool = p.pool();
                    let fairq = self
                        .pools
                        .queue(pool, lane, || routable * self.settings.slots_per_replica);
                    let slot = match fairq.admit(&c.tenant, service, p.class) {
                        Err(NoSlot::QueueFull) => Slot::QueueFull,
                        Err(NoSlot::Shed) => Slot::Shed,
                        Ok(Admission::Now(permit)) => {
                            c.permit = Some(permit);
                            Slot::Granted
                        }
                        Ok(Admission::Wait(rx)) => {
                            match tokio::time::timeout(self.settings.queue_timeout, rx).await {
                                Ok(Ok(permit)) => {
                                    c.permit = Some(permit);
                                    Slot::Granted
                                }
                                Ok(Err(_)) => Slot::Closed,
                                Err(_) => Slot::TimedOut,
                            }
                        }
                    };
                    c.fairq = Some(fairq);
                    snapshot.slot = Some(slot);
                }
            }
        }
    }
}

/// What one admitted request holds: its fair-queue slot and its reserved
/// tokens and dollars. Dropping it settles all three with the recorded usage
/// (none recorded: nothing was generated).
pub struct Charge {
    gate: Arc<Gate>,
    fairq: Option<Arc<FairQueue>>,
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
    class: Class,
}

impl Charge {
    /// A batch line's usage is written before its answer returns: the
    /// line's result is kept once it has it, and a crash must not leave a
    /// kept line unmetered.
    pub fn meter_before_answering(&self) -> bool {
        self.class == Class::Batch
    }

    /// The prompt tokens admission estimated.
    pub fn estimated_prompt(&self) -> u64 {
        self.estimate.prompt_tokens
    }

    fn cost_of(&self, size: Estimate) -> f64 {
        self.price.cost(size.prompt_tokens, size.output_tokens)
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
        match (&self.gate.shared_limits, self.shared) {
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
                    self.gate.limiter.adjust(&b.name, b.per_minute, delta);
                }
            }
        }
        if self.budgeted {
            let (estimated, actual) = (self.cost_of(self.estimate), self.cost_of(used));
            self.gate.budgets.settle(&self.tenant, estimated, actual);
        }
        // Only a request that got a slot was charged to the fair queue; one
        // refused on the way (budget, full queue, timeout) has nothing to settle.
        if let (Some(permit), Some(fairq)) = (self.permit.take(), &self.fairq) {
            fairq.settle(
                &self.tenant,
                permit.class(),
                used.service() - self.estimate.service(),
            );
            // The slot goes back last, so the next tenant is picked on corrected counters.
            drop(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snapshot(role: Role) -> Snapshot<'static> {
        Snapshot {
            role,
            model: "m",
            model_allowed: true,
            estimate: Estimate {
                prompt_tokens: 10,
                output_tokens: 20,
            },
            budget: None,
            cost: 0.5,
            limits: None,
            reservation: None,
            slot: None,
        }
    }

    fn limited(bucket: &str, refusal: Refusal) -> Option<Result<(), Limited>> {
        Some(Err(Limited {
            bucket: bucket.into(),
            refusal,
        }))
    }

    #[test]
    fn a_request_passes_limits_budget_and_queue_in_that_order() {
        let mut s = snapshot(Role::Member);
        s.budget = Some(10.0);
        assert_eq!(decide(&s), Decision::CheckLimits);
        s.limits = Some(Ok(()));
        assert_eq!(
            decide(&s),
            Decision::Reserve {
                budget: 10.0,
                cost: 0.5
            }
        );
        s.reservation = Some(Ok(()));
        assert_eq!(decide(&s), Decision::Queue { service: 50.0 });
        s.slot = Some(Slot::Granted);
        assert_eq!(decide(&s), Decision::Admit);
        // Without a budget nothing is reserved.
        let mut s = snapshot(Role::Admin);
        s.limits = Some(Ok(()));
        assert_eq!(decide(&s), Decision::Queue { service: 50.0 });
    }

    #[test]
    fn a_reader_or_a_key_without_the_model_is_refused_before_anything_is_counted() {
        let s = snapshot(Role::Reader);
        let Decision::Refuse(e) = decide(&s) else {
            panic!("a reader generated")
        };
        assert_eq!(e.status, 403);
        assert!(e.message.contains("reader"), "{}", e.message);
        let mut s = snapshot(Role::Member);
        s.model_allowed = false;
        let Decision::Refuse(e) = decide(&s) else {
            panic!("a key used a model it may not")
        };
        assert_eq!(e, ApiError::model_not_found("m"));
    }

    #[test]
    fn batch_lines_count_against_a_batch_token_limit_where_a_scope_has_one() {
        use strata_core::tenant::{ApiKeyRecord, Isolation, Tenant, TenantId};
        let limits = |rpm, tpm, batch| RateLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            batch_tokens_per_minute: batch,
        };
        let principal = |class, key: RateLimits, tenant: RateLimits| Principal {
            key: ApiKeyRecord {
                id: "k".into(),
                tenant_id: TenantId("t".into()),
                name: "k".into(),
                role: Role::Member,
                models: None,
                limits: key,
                priority: Default::default(),
                expires_at_ms: None,
                revoked_at_ms: None,
                created_at_ms: 0,
                digest: [0; 32],
            },
            tenant: Tenant {
                id: TenantId("t".into()),
                name: "t".into(),
                isolation: Isolation::Shared,
                limits: tenant,
                monthly_budget_usd: None,
                priority: Default::default(),
                created_at_ms: 0,
            },
            class,
        };
        let names = |p: &Principal| -> Vec<String> {
            limit_buckets(p, 10).into_iter().map(|b| b.name).collect()
        };
        let key = limits(Some(5), Some(100), None);
        let tenant = limits(Some(50), Some(1000), Some(9000));
        // Interactive: every rpm/tpm limit, never the batch one.
        let p = principal(Class::Interactive, key, tenant);
        assert_eq!(
            names(&p),
            ["key:k:rpm", "key:k:tpm", "tenant:t:rpm", "tenant:t:tpm"]
        );
        // Batch: the tenant's batch limit instead of its interactive ones;
        // the key has none, so its interactive limits still hold (a key
        // cannot escape its limits by running a batch).
        let p = principal(Class::Batch, key, tenant);
        assert_eq!(names(&p), ["key:k:rpm", "key:k:tpm", "tenant:t:batch_tpm"]);
        // A line larger than the whole batch allowance fails (400), where
        // waiting would only run out its window.
        let mut s = snapshot(Role::Member);
        s.limits = limited("tenant:t:batch_tpm", Refusal::TooLarge);
        let Decision::Refuse(e) = decide(&s) else {
            panic!()
        };
        assert_eq!((e.status, e.param.as_deref()), (400, Some("max_tokens")));
        assert!(
            e.message.contains("batch tokens-per-minute"),
            "{}",
            e.message
        );
    }

    #[test]
    fn refusals_say_which_limit_and_when_to_come_back() {
        let mut s = snapshot(Role::Member);
        s.limits = limited("key:k1:rpm", Refusal::RetryAfter(2.2));
        let Decision::Refuse(e) = decide(&s) else {
            panic!()
        };
        assert_eq!((e.status, e.retry_after_secs), (429, Some(3)));
        assert!(e.message.contains("requests per minute for this key"));
        s.limits = limited("tenant:t:tpm", Refusal::TooLarge);
        let Decision::Refuse(e) = decide(&s) else {
            panic!()
        };
        assert_eq!((e.status, e.retry_after_secs), (429, Some(60)));
        assert!(
            e.message.contains(
                "(30 tokens with max_tokens) is larger than the tenant's tokens-per-minute limit"
            ),
            "{}",
            e.message
        );

        let mut s = snapshot(Role::Member);
        s.budget = Some(1.0);
        s.limits = Some(Ok(()));
        s.reservation = Some(Err(OverBudget {
            budget: 1.0,
            spent: 0.75,
        }));
        let Decision::Refuse(e) = decide(&s) else {
            panic!()
        };
        assert_eq!(e.status, 402);
        assert!(e.message.contains("$1.0000") && e.message.contains("$0.7500"));

        for (slot, status) in [
            (Slot::QueueFull, 429),
            (Slot::TimedOut, 429),
            (Slot::Closed, 503),
            (Slot::Shed, 503),
        ] {
            let mut s = snapshot(Role::Member);
            s.limits = Some(Ok(()));
            s.slot = Some(slot);
            let Decision::Refuse(e) = decide(&s) else {
                panic!()
            };
            assert_eq!(e.status, status, "{slot:?}");
            // Told when to come back, where a retry can succeed.
            if slot == Slot::Shed {
                assert_eq!(e.retry_after_secs, Some(SHED_RETRY_AFTER_SECS));
            }
        }
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Admin), Just(Role::Member), Just(Role::Reader)]
    }

    fn verdict() -> impl Strategy<Value = Result<(), Limited>> {
        prop_oneof![
            2 => Just(Ok(())),
            1 => (0.0f64..120.0).prop_map(|s| Err(Limited { bucket: "key:k:rpm".into(), refusal: Refusal::RetryAfter(s) })),
            1 => Just(Err(Limited { bucket: "tenant:t:tpm".into(), refusal: Refusal::TooLarge })),
        ]
    }

    fn slot() -> impl Strategy<Value = Slot> {
        prop_oneof![
            3 => Just(Slot::Granted),
            1 => Just(Slot::QueueFull),
            1 => Just(Slot::TimedOut),
            1 => Just(Slot::Closed),
            1 => Just(Slot::Shed),
        ]
    }

    proptest! {
        /// Walks `decide` the way the shell does, answering each question
        /// with the generated facts: it ends, asks each question at most
        /// once and in order, admits only when every check passed, and
        /// refuses with the status of the first check that failed.
        #[test]
        fn a_request_is_admitted_only_when_every_check_passes_and_refused_by_the_first_that_fails(
            role in role(),
            model_allowed in any::<bool>(),
            prompt in 0u64..100_000,
            output in 0u64..100_000,
            budget in proptest::option::of(0.0f64..10.0),
            cost in 0.0f64..10.0,
            spent in 0.0f64..10.0,
            limits in verdict(),
            slot in slot(),
        ) {
            let mut s = Snapshot {
                role, model: "m", model_allowed,
                estimate: Estimate { prompt_tokens: prompt, output_tokens: output },
                budget, cost, limits: None, reservation: None, slot: None,
            };
            let mut asked = Vec::new();
            let outcome = loop {
                match decide(&s) {
                    Decision::CheckLimits => { asked.push("limits"); s.limits = Some(limits.clone()) }
                    Decision::Reserve { budget: b, cost: c } => {
                        prop_assert_eq!((Some(b), c), (budget, cost));
                        asked.push("budget");
                        s.reservation = Some(if spent + c > b { Err(OverBudget { budget: b, spent }) } else { Ok(()) });
                    }
                    Decision::Queue { service } => {
                        prop_assert_eq!(service, prompt as f64 * PROMPT_WEIGHT + output as f64 * OUTPUT_WEIGHT);
                        asked.push("queue");
                        s.slot = Some(slot);
                    }
                    end => break end,
                }
                prop_assert!(asked.len() <= 3);
            };
            let allowed = role != Role::Reader && model_allowed;
            let fits = budget.is_none_or(|b| spent + cost <= b);
            let mut expected = Vec::new();
            if allowed { expected.push("limits"); }
            if allowed && limits.is_ok() && budget.is_some() { expected.push("budget"); }
            if allowed && limits.is_ok() && fits { expected.push("queue"); }
            prop_assert_eq!(&asked, &expected);
            let status = match outcome {
                Decision::Admit => 200,
                Decision::Refuse(e) => e.status,
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            let first_failure = if role == Role::Reader { 403 }
                else if !model_allowed { 404 }
                else if limits.is_err() { 429 }
                else if !fits { 402 }
                else { match slot { Slot::Granted => 200, Slot::Closed | Slot::Shed => 503, _ => 429 } };
            prop_assert_eq!(status, first_failure);
        }
    }
}
