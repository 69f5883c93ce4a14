//! Cost attribution, kept pure: an instance's bill for an interval (price ×
//! time) is split among the tenants whose requests it served, in
//! proportion to the tokens each used there; what its capacity could have
//! served but nobody asked for is the "idle" line, shown, not spread. The
//! parts always add up to the bill.
//!
//! The ledger: every instance accrues its price from launch to end (or
//! now), cut into clock hours; each hour is split by the tokens the usage
//! ledger recorded on that instance in that hour (`charges`). `report` sums
//! the charges by tenant, model, pool, instance type or class (interactive,
//! batch, idle); `focus_csv` writes them as FOCUS-style billing rows.

use std::collections::BTreeMap;

use serde::Serialize;
use strata_core::store::{InstanceKind, InstanceRecord, ReplicaUsage};

/// One instance over one accounting interval.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceInterval {
    pub instance: String,
    pub price_per_hour: f64,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Tokens per second the instance serves at full load.
    pub capacity_tokens_per_s: f64,
}

impl InstanceInterval {
    pub fn bill(&self) -> f64 {
        let hours = (self.end_ms - self.start_ms).max(0) as f64 / 3_600_000.0;
        self.price_per_hour * hours
    }

    fn capacity_tokens(&self) -> f64 {
        self.capacity_tokens_per_s * (self.end_ms - self.start_ms).max(0) as f64 / 1000.0
    }
}

/// Who an interval's bill belongs to, by tenant (or any finer key).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attribution<K: Ord = String> {
    pub bill: f64,
    pub by_tenant: BTreeMap<K, f64>,
    /// Capacity paid for and not used.
    pub idle: f64,
}

/// Splits `interval`'s bill by `tokens` used per tenant on that instance.
/// Usage above the capacity (a measured capacity too low) leaves no idle
/// share and divides the whole bill by usage.
pub fn attribute<K: Ord + Clone>(
    interval: &InstanceInterval,
    tokens: &BTreeMap<K, u64>,
) -> Attribution<K> {
    let bill = interval.bill();
    let used: f64 = tokens.values().map(|&t| t as f64).sum();
    let basis = used.max(interval.capacity_tokens());
    if basis <= 0.0 {
        return Attribution {
            bill,
            by_tenant: BTreeMap::new(),
            idle: bill,
        };
    }
    let by_tenant: BTreeMap<K, f64> = tokens
        .iter()
        .filter(|(_, &t)| t > 0)
        .map(|(tenant, &t)| (tenant.clone(), bill * t as f64 / basis))
        .collect();
    let charged: f64 = by_tenant.values().sum();
    Attribution {
        bill,
        by_tenant,
        idle: (bill - charged).max(0.0),
    }
}

/// One line of the ledger: part of one instance's bill for one hour,
/// charged to a tenant for a model, or idle (`tenant` `None`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Charge {
    pub instance: String,
    pub kind: InstanceKind,
    pub tenant: Option<String>,
    /// The model the tokens were for (idle: the instance's model).
    pub model: String,
    /// Batch lines' tokens (idle: false).
    pub batch: bool,
    pub start_ms: i64,
    pub end_ms: i64,
    pub tokens: u64,
    pub cost: f64,
}

const HOUR_MS: i64 = 3_600_000;

/// The ledger for `[since_ms, until_ms)`: each instance's running time in
/// that range (an instance still running counts to `now_ms`), hour by
/// hour, split by the usage rows recorded on it.
pub fn charges(
    instances: &[InstanceRecord],
    usage: &[ReplicaUsage],
    since_ms: i64,
    until_ms: i64,
    now_ms: i64,
) -> Vec<Charge> {
    // (replica, hour) -> (tenant, model, batch) -> tokens
    type ByTenantModel = BTreeMap<(String, String, bool), u64>;
    let mut used: BTreeMap<(&str, i64), ByTenantModel> = BTreeMap::new();
    for u in usage {
        *used
            .entry((u.replica.as_str(), u.hour_ms))
            .or_default()
            .entry((u.tenant_id.clone(), u.model.clone(), u.batch))
            .or_default() += u.tokens;
    }
    let mut out = Vec::new();
    for i in instances {
        let start = i.started_at_ms.max(since_ms);
        let end = i.ended_at_ms.unwrap_or(now_ms).min(until_ms);
        let mut from = start;
        while from < end {
            let hour = from.div_euclid(HOUR_MS) * HOUR_MS;
            let to = (hour + HOUR_MS).min(end);
            let interval = InstanceInterval {
                instance: i.id.clone(),
                price_per_hour: i.kind.price_per_hour,
                start_ms: from,
                end_ms: to,
                capacity_tokens_per_s: i.kind.tokens_per_s,
            };
            let empty = BTreeMap::new();
            let tokens = used.get(&(i.id.as_str(), hour)).unwrap_or(&empty);
            let a = attribute(&interval, tokens);
            let line = |tenant: Option<String>, model: String, batch, tokens, cost| Charge {
                instance: i.id.clone(),
                kind: i.kind.clone(),
                tenant,
                model,
                batch,
                start_ms: from,
                end_ms: to,
                tokens,
                cost,
            };
            for ((tenant, model, batch), cost) in a.by_tenant {
                let n = tokens[&(tenant.clone(), model.clone(), batch)];
                out.push(line(Some(tenant), model, batch, n, cost));
            }
            out.push(line(None, i.kind.model.clone(), false, 0, a.idle));
            from = to;
        }
    }
    out
}

/// What `report` sums charges by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Tenant,
    Model,
    Pool,
    InstanceType,
    /// `interactive`, `batch` and `(idle)`: what idle capacity batch work
    /// turned into charged use.
    Class,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "tenant" => GroupBy::Tenant,
            "model" => GroupBy::Model,
            "pool" => GroupBy::Pool,
            "instance-type" | "instance_type" => GroupBy::InstanceType,
            "class" => GroupBy::Class,
            _ => return None,
        })
    }
}

/// The label idle capacity is reported under when grouping by tenant or class.
pub const IDLE: &str = "(idle)";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportLine {
    pub key: String,
    pub cost: f64,
    pub tokens: u64,
    /// Instance-hours behind the line (by tenant: none, the hours are shared).
    pub instance_hours: f64,
}

/// Charges summed by `by`, dearest first. By tenant or class, idle capacity
/// is its own line; otherwise it stays with the model, pool or type that
/// paid for it.
pub fn report(charges: &[Charge], by: GroupBy) -> Vec<ReportLine> {
    let mut lines: BTreeMap<String, ReportLine> = BTreeMap::new();
    for c in charges {
        let key = match by {
            GroupBy::Tenant => c.tenant.clone().unwrap_or_else(|| IDLE.into()),
            GroupBy::Model => c.model.clone(),
            GroupBy::Pool => c.kind.pool.clone(),
            GroupBy::InstanceType => {
                format!("{} ({})", c.kind.instance_type, c.kind.capacity.as_str())
            }
            GroupBy::Class => class_of(c).into(),
        };
        let line = lines.entry(key.clone()).or_insert(ReportLine {
            key,
            cost: 0.0,
            tokens: 0,
            instance_hours: 0.0,
        });
        line.cost += c.cost;
        line.tokens += c.tokens;
        // Each hour of an instance has exactly one idle charge: count its time there.
        if c.tenant.is_none() && !matches!(by, GroupBy::Tenant | GroupBy::Class) {
            line.instance_hours += (c.end_ms - c.start_ms) as f64 / HOUR_MS as f64;
        }
    }
    let mut out: Vec<ReportLine> = lines.into_values().collect();
    out.sort_by(|a, b| b.cost.total_cmp(&a.cost).then_with(|| a.key.cmp(&b.key)));
    out
}

/// `interactive`, `batch` or `(idle)`.
fn class_of(c: &Charge) -> &'static str {
    match (&c.tenant, c.batch) {
        (None, _) => IDLE,
        (Some(_), true) => "batch",
        (Some(_), false) => "interactive",
    }
}

/// RFC 3339 UTC time for Unix milliseconds.
fn rfc3339(ms: i64) -> String {
    strata_core::calendar::utc_timestamp(ms).replacen(' ', "T", 1) + "Z"
}

/// The charges as FOCUS-style CSV (FinOps Open Cost and Usage
/// Specification column names; strata's own columns start with `x_`).
/// Spot is the `Dynamic` pricing category, on-demand `Standard`.
pub fn focus_csv(charges: &[Charge]) -> String {
    let mut out = String::from(
        "BilledCost,EffectiveCost,BillingCurrency,ChargePeriodStart,ChargePeriodEnd,ChargeCategory,\
         ResourceId,ResourceType,ServiceName,AvailabilityZone,PricingCategory,ConsumedQuantity,\
         ConsumedUnit,Tags,x_Tenant,x_Model,x_Pool\n",
    );
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for c in charges {
        let tenant = c.tenant.as_deref().unwrap_or(IDLE);
        let tags = serde_json::json!({
            "strata/tenant": tenant,
            "strata/model": c.model,
            "strata/pool": c.kind.pool,
            "strata/capacity": c.kind.capacity.as_str(),
            "strata/class": class_of(c),
        });
        let row = [
            format!("{:.10}", c.cost),
            format!("{:.10}", c.cost),
            "USD".into(),
            rfc3339(c.start_ms),
            rfc3339(c.end_ms),
            "Usage".into(),
            quote(&c.instance),
            quote(&c.kind.instance_type),
            "strata".into(),
            quote(&c.kind.zone),
            match c.kind.capacity {
                strata_core::config::CapacityType::Spot => "Dynamic",
                strata_core::config::CapacityType::OnDemand => "Standard",
            }
            .into(),
            c.tokens.to_string(),
            "Tokens".into(),
            quote(&tags.to_string()),
            quote(tenant),
            quote(&c.model),
            quote(&c.kind.pool),
        ];
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use strata_core::config::CapacityType;
    use strata_core::store::InstanceState;

    fn instance(id: &str, start: i64, end: Option<i64>, price: f64, tps: f64) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            provider: "local".into(),
            endpoint: String::new(),
            state: InstanceState::Stopped,
            started_at_ms: start,
            ended_at_ms: end,
            detail: None,
            kind: InstanceKind {
                model: "gemma".into(),
                instance_type: "small".into(),
                capacity: CapacityType::Spot,
                price_per_hour: price,
                tokens_per_s: tps,
                ..InstanceKind::default()
            },
        }
    }

    fn used(replica: &str, tenant: &str, hour: i64, tokens: u64) -> ReplicaUsage {
        ReplicaUsage {
            replica: replica.into(),
            tenant_id: tenant.into(),
            model: "gemma".into(),
            hour_ms: hour * HOUR_MS,
            tokens,
            batch: false,
        }
    }

    #[test]
    fn an_instance_is_billed_hour_by_hour_to_its_tenants_and_idle() {
        // 90 minutes at $2/h from 00:30: half an hour in hour 0, a whole hour 1.
        let i = instance("i-1", HOUR_MS / 2, Some(2 * HOUR_MS), 2.0, 100.0);
        let usage = [
            used("i-1", "acme", 0, 90_000),
            used("i-1", "globex", 1, 36_000),
        ];
        let c = charges(&[i], &usage, 0, 10 * HOUR_MS, 10 * HOUR_MS);
        let total: f64 = c.iter().map(|c| c.cost).sum();
        assert!((total - 3.0).abs() < 1e-9, "{total}");
        let by = report(&c, GroupBy::Tenant);
        let cost = |k: &str| by.iter().find(|l| l.key == k).unwrap().cost;
        // Hour 0: capacity 180,000 tokens, acme used half of the $1.
        assert!((cost("acme") - 0.5).abs() < 1e-9);
        // Hour 1: capacity 360,000 tokens, globex used a tenth of $2.
        assert!((cost("globex") - 0.2).abs() < 1e-9);
        assert!((cost(IDLE) - 2.3).abs() < 1e-9);
        let by_type = report(&c, GroupBy::InstanceType);
        assert_eq!(by_type.len(), 1);
        assert_eq!(by_type[0].key, "small (spot)");
        assert!((by_type[0].instance_hours - 1.5).abs() < 1e-9);
        assert_eq!(by_type[0].tokens, 126_000);
    }

    #[test]
    fn batch_tokens_are_charged_apart_and_come_out_of_the_idle_line() {
        // An hour at $2 of 100 tokens/s (360,000 tokens): acme's
        // interactive requests used a tenth, its batch lines half.
        let i = instance("i-1", 0, Some(HOUR_MS), 2.0, 100.0);
        let batch = ReplicaUsage {
            batch: true,
            ..used("i-1", "acme", 0, 180_000)
        };
        let c = charges(
            std::slice::from_ref(&i),
            &[used("i-1", "acme", 0, 36_000), batch],
            0,
            HOUR_MS,
            HOUR_MS,
        );
        let by = report(&c, GroupBy::Class);
        let cost = |k: &str| by.iter().find(|l| l.key == k).map_or(0.0, |l| l.cost);
        assert!((cost("interactive") - 0.2).abs() < 1e-9, "{by:?}");
        assert!((cost("batch") - 1.0).abs() < 1e-9, "{by:?}");
        assert!((cost(IDLE) - 0.8).abs() < 1e-9, "{by:?}");
        assert_eq!(
            by.iter().find(|l| l.key == "batch").unwrap().tokens,
            180_000
        );
        // By tenant, both are acme's; the idle line is what batch work did not use.
        let by_tenant = report(&c, GroupBy::Tenant);
        assert_eq!(by_tenant.len(), 2);
        assert!((by_tenant[0].cost - 1.2).abs() < 1e-9 && by_tenant[0].key == "acme");
        assert!(focus_csv(&c).contains("strata/class\"\":\"\"batch"));
        // Without the batch, the same hour was 90% idle.
        let alone = charges(&[i], &[used("i-1", "acme", 0, 36_000)], 0, HOUR_MS, HOUR_MS);
        assert!((report(&alone, GroupBy::Class)[0].cost - 1.8).abs() < 1e-9);
    }

    #[test]
    fn the_range_clips_instances_and_running_ones_count_to_now() {
        let done = instance("i-1", 0, Some(4 * HOUR_MS), 1.0, 10.0);
        let running = instance("i-2", 3 * HOUR_MS, None, 1.0, 10.0);
        let c = charges(&[done, running], &[], HOUR_MS, 10 * HOUR_MS, 5 * HOUR_MS);
        let total: f64 = c.iter().map(|c| c.cost).sum();
        assert!(
            (total - 5.0).abs() < 1e-9,
            "3 h of i-1, 2 h of i-2: {total}"
        );
        assert!(c
            .iter()
            .all(|c| c.start_ms >= HOUR_MS && c.end_ms <= 5 * HOUR_MS));
    }

    #[test]
    fn focus_rows_carry_period_resource_and_tags() {
        let i = instance("i-\"1", 0, Some(HOUR_MS), 0.5, 10.0);
        let c = charges(
            &[i],
            &[used("i-\"1", "acme", 0, 9_000)],
            0,
            HOUR_MS,
            HOUR_MS,
        );
        let csv = focus_csv(&c);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3, "header, acme, idle: {csv}");
        assert!(lines[0].starts_with("BilledCost,EffectiveCost,"));
        assert!(lines[1].starts_with("0.1250000000,0.1250000000,USD,1970-01-01T00:00:00Z,1970-01-01T01:00:00Z,Usage,\"i-\"\"1\",\"small\",strata,\"local\",Dynamic,9000,Tokens,"), "{}", lines[1]);
        assert!(
            lines[1].contains("\"\"strata/tenant\"\":\"\"acme\"\""),
            "{}",
            lines[1]
        );
        assert!(lines[2].contains(",\"(idle)\","), "{}", lines[2]);
    }

    fn hour(capacity: f64) -> InstanceInterval {
        InstanceInterval {
            instance: "i-1".into(),
            price_per_hour: 3.6,
            start_ms: 0,
            end_ms: 3_600_000,
            capacity_tokens_per_s: capacity,
        }
    }

    fn usage(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    #[test]
    fn a_half_used_instance_bills_half_to_its_tenants_and_half_as_idle() {
        // 100 tokens/s for an hour = 360,000 tokens of capacity.
        let a = attribute(
            &hour(100.0),
            &usage(&[("acme", 120_000), ("globex", 60_000)]),
        );
        assert!((a.bill - 3.6).abs() < 1e-12);
        assert!((a.by_tenant["acme"] - 1.2).abs() < 1e-12);
        assert!((a.by_tenant["globex"] - 0.6).abs() < 1e-12);
        assert!((a.idle - 1.8).abs() < 1e-12);
    }

    #[test]
    fn an_unused_instance_is_all_idle_and_overuse_leaves_none() {
        let a = attribute(&hour(100.0), &BTreeMap::<String, u64>::new());
        assert_eq!((a.idle, a.by_tenant.len()), (a.bill, 0));
        let a = attribute(&hour(10.0), &usage(&[("acme", 72_000)]));
        assert!((a.by_tenant["acme"] - 3.6).abs() < 1e-12 && a.idle == 0.0);
    }

    proptest! {
        #[test]
        fn tenants_plus_idle_equal_the_bill(
            price in 0.01f64..50.0,
            minutes in 1i64..600,
            capacity in 0.0f64..5000.0,
            tokens in proptest::collection::vec(0u64..50_000_000, 0..12),
        ) {
            let interval = InstanceInterval {
                instance: "i".into(),
                price_per_hour: price,
                start_ms: 1_000,
                end_ms: 1_000 + minutes * 60_000,
                capacity_tokens_per_s: capacity,
            };
            let usage: BTreeMap<String, u64> =
                tokens.iter().enumerate().map(|(i, t)| (format!("ten_{i}"), *t)).collect();
            let a = attribute(&interval, &usage);
            let total = a.by_tenant.values().sum::<f64>() + a.idle;
            prop_assert!((total - a.bill).abs() <= a.bill * 0.001, "{total} vs {}", a.bill);
            prop_assert!(a.idle >= 0.0 && a.by_tenant.values().all(|&c| c >= 0.0));
            // More tokens, more cost.
            for (x, y) in usage.iter().zip(usage.iter().skip(1)) {
                let (cx, cy) = (a.by_tenant.get(x.0).copied().unwrap_or(0.0), a.by_tenant.get(y.0).copied().unwrap_or(0.0));
                if x.1 > y.1 { prop_assert!(cx >= cy); }
            }
        }

        #[test]
        fn the_ledger_adds_up_to_every_instance_bill(
            spans in proptest::collection::vec((0i64..20_000_000, 1i64..20_000_000, 0.01f64..40.0, 0.0f64..500.0), 1..6),
            rows in proptest::collection::vec((0usize..6, 0usize..4, 0i64..12, 0u64..5_000_000), 0..40),
        ) {
            let instances: Vec<InstanceRecord> = spans.iter().enumerate()
                .map(|(n, &(start, len, price, tps))| instance(&format!("i-{n}"), start, Some(start + len), price, tps))
                .collect();
            let usage: Vec<ReplicaUsage> = rows.iter()
                .map(|&(i, t, h, n)| used(&format!("i-{i}"), &format!("ten_{t}"), h, n))
                .collect();
            let c = charges(&instances, &usage, 0, i64::MAX, 0);
            let bill: f64 = instances.iter().map(|i| i.kind.price_per_hour * (i.ended_at_ms.unwrap() - i.started_at_ms) as f64 / 3.6e6).sum();
            for by in [GroupBy::Tenant, GroupBy::Model, GroupBy::Pool, GroupBy::InstanceType, GroupBy::Class] {
                let total: f64 = report(&c, by).iter().map(|l| l.cost).sum();
                prop_assert!((total - bill).abs() <= bill * 0.001, "{by:?}: {total} vs {bill}");
            }
            prop_assert!(c.iter().all(|c| c.cost >= 0.0));
        }
    }
}
