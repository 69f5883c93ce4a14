//! Cost attribution, kept pure: an instance's bill for an interval (price ×
//! time) is split among the tenants whose requests it served, in
//! proportion to the tokens each used there; what its capacity could have
//! served but nobody asked for is the "idle" line, shown, not spread. The
//! parts always add up to the bill.

use std::collections::BTreeMap;

use serde::Serialize;

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

/// Who an interval's bill belongs to.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Attribution {
    pub bill: f64,
    pub by_tenant: BTreeMap<String, f64>,
    /// Capacity paid for and not used.
    pub idle: f64,
}

impl Attribution {
    /// Adds another interval's attribution to this one.
    pub fn add(&mut self, other: &Attribution) {
        self.bill += other.bill;
        self.idle += other.idle;
        for (tenant, cost) in &other.by_tenant {
            *self.by_tenant.entry(tenant.clone()).or_default() += cost;
        }
    }
}

/// Splits `interval`'s bill by `tokens` used per tenant on that instance.
/// Usage above the capacity (a measured capacity too low) leaves no idle
/// share and divides the whole bill by usage.
pub fn attribute(interval: &InstanceInterval, tokens: &BTreeMap<String, u64>) -> Attribution {
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
    let by_tenant: BTreeMap<String, f64> = tokens
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        let a = attribute(&hour(100.0), &BTreeMap::new());
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
    }
}
