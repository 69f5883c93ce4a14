//! Monthly budgets in dollars per tenant: a request is checked against an
//! estimate of its cost before it runs and settled with its real usage after.

use std::sync::Mutex;
use std::time::Duration;

use strata_core::calendar::month_start_ms;

use crate::tenancy::FastMap;

/// One tenant's month: what the ledger says was spent, plus what requests in
/// flight may still spend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MonthSpend {
    pub month_start_ms: i64,
    pub spent: f64,
    pub reserved: f64,
    /// When `spent` was read from the ledger.
    pub read_at_ms: i64,
}

/// Why a request may not start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverBudget {
    pub budget: f64,
    pub spent: f64,
}

impl MonthSpend {
    /// Reserves `estimate` if it fits in `budget`.
    pub fn reserve(&mut self, budget: f64, estimate: f64) -> Result<(), OverBudget> {
        if self.spent + self.reserved + estimate > budget {
            return Err(OverBudget {
                budget,
                spent: self.spent,
            });
        }
        self.reserved += estimate;
        Ok(())
    }

    /// Replaces the reservation with the real cost.
    pub fn settle(&mut self, estimate: f64, actual: f64) {
        self.reserved = (self.reserved - estimate).max(0.0);
        self.spent += actual;
    }
}

/// Month spends of tenants with a budget, loaded from the ledger on first
/// use and at each new month.
#[derive(Default)]
pub struct Budgets {
    months: Mutex<FastMap<String, MonthSpend>>,
}

impl Budgets {
    /// The tenant's spend for the month of `now_ms`, if already known.
    pub fn known(&self, tenant: &str, now_ms: i64) -> Option<MonthSpend> {
        let months = self.months.lock().expect("budget lock");
        months
            .get(tenant)
            .filter(|m| m.month_start_ms == month_start_ms(now_ms))
            .copied()
    }

    /// Whether the tenant's spend must be read from the ledger: not known
    /// for this month, or (where other gateways spend too) read longer
    /// than `refresh` ago.
    pub fn needs_read(&self, tenant: &str, now_ms: i64, refresh: Option<Duration>) -> bool {
        match self.known(tenant, now_ms) {
            None => true,
            Some(m) => refresh.is_some_and(|r| now_ms - m.read_at_ms >= r.as_millis() as i64),
        }
    }

    /// Records the ledger's figure for a month read at `now_ms`; requests in
    /// flight keep their reservations within the same month.
    pub fn load(&self, tenant: &str, month_start_ms: i64, spent: f64, now_ms: i64) {
        let mut months = self.months.lock().expect("budget lock");
        let fresh = MonthSpend {
            month_start_ms,
            spent,
            reserved: 0.0,
            read_at_ms: now_ms,
        };
        let m = months.entry(tenant.to_owned()).or_insert(fresh);
        if m.month_start_ms != month_start_ms {
            *m = fresh;
        } else {
            m.spent = spent;
            m.read_at_ms = now_ms;
        }
    }

    pub fn reserve(&self, tenant: &str, budget: f64, estimate: f64) -> Result<(), OverBudget> {
        let mut months = self.months.lock().expect("budget lock");
        match months.get_mut(tenant) {
            Some(m) => m.reserve(budget, estimate),
            None => Ok(()),
        }
    }

    pub fn settle(&self, tenant: &str, estimate: f64, actual: f64) {
        if let Some(m) = self.months.lock().expect("budget lock").get_mut(tenant) {
            m.settle(estimate, actual);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_block_what_would_overspend_and_settle_to_real_cost() {
        let mut m = MonthSpend {
            month_start_ms: 0,
            spent: 0.0,
            reserved: 0.0,
            read_at_ms: 0,
        };
        m.reserve(1.0, 0.6).unwrap();
        assert!(
            m.reserve(1.0, 0.6).is_err(),
            "two estimates together exceed the budget"
        );
        m.settle(0.6, 0.2);
        m.reserve(1.0, 0.6).unwrap();
        m.settle(0.6, 0.7);
        assert!((m.spent - 0.9).abs() < 1e-12);
        assert_eq!(
            m.reserve(1.0, 0.2),
            Err(OverBudget {
                budget: 1.0,
                spent: m.spent
            })
        );
    }

    #[test]
    fn shared_budgets_are_read_again_after_the_refresh() {
        let b = Budgets::default();
        let t0 = 1_796_005_521_000;
        assert!(b.needs_read("t", t0, None));
        b.load("t", month_start_ms(t0), 0.5, t0);
        b.reserve("t", 1.0, 0.3).unwrap();
        // One gateway alone never reads again within the month.
        assert!(!b.needs_read("t", t0 + 3_600_000, None));
        let refresh = Some(Duration::from_secs(5));
        assert!(!b.needs_read("t", t0 + 4_999, refresh));
        assert!(b.needs_read("t", t0 + 5_000, refresh));
        // Another gateway spent 0.4 meanwhile: the ledger says 0.9, and the
        // reservation in flight here still counts.
        b.load("t", month_start_ms(t0), 0.9, t0 + 5_000);
        assert!(b.reserve("t", 1.0, 0.05).is_err());
        b.settle("t", 0.3, 0.0);
        b.reserve("t", 1.0, 0.05).unwrap();
    }
}
