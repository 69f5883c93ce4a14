//! Requests/min and tokens/min per key and per tenant, as GCRA (the generic
//! cell rate algorithm): each limit is one "theoretical arrival time", a
//! burst of up to a minute's worth is allowed, and a refusal says exactly
//! when the request would fit. Pure: every call takes `now` in seconds.

use std::sync::Mutex;

use crate::tenancy::FastMap;

/// Window a per-minute rate is measured over.
const WINDOW_SECS: f64 = 60.0;

/// One limit's state.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gcra {
    /// Theoretical arrival time, seconds on the caller's clock.
    tat: f64,
}

/// Why a check failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// Fits after this many seconds.
    RetryAfter(f64),
    /// Larger than the whole per-minute allowance: it never fits.
    TooLarge,
}

impl Gcra {
    /// The TAT after admitting `cost` at `per_minute`, or why not.
    fn try_admit(self, now: f64, per_minute: u32, cost: u64) -> Result<Gcra, Refusal> {
        if cost > u64::from(per_minute) {
            return Err(Refusal::TooLarge);
        }
        let interval = WINDOW_SECS / f64::from(per_minute);
        let tat = self.tat.max(now) + cost as f64 * interval;
        let over = tat - now - WINDOW_SECS;
        // A hair of tolerance so float rounding never refuses an exact fit.
        if over > 1e-9 {
            Err(Refusal::RetryAfter(over))
        } else {
            Ok(Gcra { tat })
        }
    }

    /// Adds (or with a negative `delta`, returns) cost after the fact.
    /// A TAT pushed below `now` grants nothing: admission starts from `now`.
    fn adjust(&mut self, per_minute: u32, delta: i64) {
        self.tat += delta as f64 * WINDOW_SECS / f64::from(per_minute);
    }
}

/// One limit to check: which bucket, its rate, and this request's cost.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bucket {
    /// `key:<id>:rpm`, `tenant:<id>:tpm`, ...
    pub name: String,
    pub per_minute: u32,
    pub cost: u64,
}

/// Every bucket's state, behind one lock so a request is admitted by all of
/// its limits or by none.
#[derive(Default)]
pub struct Limiter {
    buckets: Mutex<FastMap<String, Gcra>>,
}

/// Which limit refused, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub bucket: String,
    pub refusal: Refusal,
}

impl Limiter {
    /// Admits the request against every bucket, or changes none of them.
    pub fn check(&self, now: f64, buckets: &[Bucket]) -> Result<(), Limited> {
        let mut state = self.buckets.lock().expect("limiter lock");
        let mut next = Vec::with_capacity(buckets.len());
        let mut worst: Option<Limited> = None;
        for b in buckets {
            let g = state.get(&b.name).copied().unwrap_or_default();
            match g.try_admit(now, b.per_minute, b.cost) {
                Ok(g) => next.push((b.name.clone(), g)),
                Err(refusal) => {
                    let later = match (&worst, refusal) {
                        (None, _) => true,
                        (Some(w), Refusal::TooLarge) => w.refusal != Refusal::TooLarge,
                        (
                            Some(Limited {
                                refusal: Refusal::RetryAfter(a),
                                ..
                            }),
                            Refusal::RetryAfter(b),
                        ) => b > *a,
                        (Some(_), Refusal::RetryAfter(_)) => false,
                    };
                    if later {
                        worst = Some(Limited {
                            bucket: b.name.clone(),
                            refusal,
                        });
                    }
                }
            }
        }
        if let Some(w) = worst {
            return Err(w);
        }
        for (name, g) in next {
            state.insert(name, g);
        }
        Ok(())
    }

    /// Settles a bucket with the real cost once known (`actual - estimated`).
    pub fn adjust(&self, name: &str, per_minute: u32, delta: i64) {
        if delta == 0 {
            return;
        }
        if let Some(g) = self.buckets.lock().expect("limiter lock").get_mut(name) {
            g.adjust(per_minute, delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rpm(name: &str, per_minute: u32) -> Bucket {
        Bucket {
            name: name.into(),
            per_minute,
            cost: 1,
        }
    }

    #[test]
    fn a_minutes_worth_bursts_then_one_per_interval() {
        let l = Limiter::default();
        for _ in 0..6 {
            l.check(0.0, &[rpm("k", 6)]).unwrap();
        }
        let refused = l.check(0.0, &[rpm("k", 6)]).unwrap_err();
        match refused.refusal {
            Refusal::RetryAfter(s) => assert!((s - 10.0).abs() < 1e-9, "{s}"),
            other => panic!("{other:?}"),
        }
        assert!(l.check(9.9, &[rpm("k", 6)]).is_err());
        l.check(10.0, &[rpm("k", 6)]).unwrap();
    }

    #[test]
    fn all_buckets_or_none() {
        let l = Limiter::default();
        l.check(0.0, &[rpm("tenant", 1)]).unwrap();
        let err = l
            .check(0.0, &[rpm("key", 5), rpm("tenant", 1)])
            .unwrap_err();
        assert_eq!(err.bucket, "tenant");
        // The key bucket was not charged by the refused request.
        for _ in 0..5 {
            l.check(0.0, &[rpm("key", 5)]).unwrap();
        }
    }

    #[test]
    fn a_request_larger_than_a_minute_never_fits() {
        let l = Limiter::default();
        let b = Bucket {
            name: "t".into(),
            per_minute: 100,
            cost: 101,
        };
        assert_eq!(l.check(0.0, &[b]).unwrap_err().refusal, Refusal::TooLarge);
    }

    #[test]
    fn settling_returns_unused_tokens() {
        let l = Limiter::default();
        let big = |cost| Bucket {
            name: "tpm".into(),
            per_minute: 1000,
            cost,
        };
        l.check(0.0, &[big(900)]).unwrap();
        assert!(l.check(0.0, &[big(200)]).is_err());
        l.adjust("tpm", 1000, -700); // used 200 of the 900 estimated
        l.check(0.0, &[big(800)]).unwrap();
        assert!(l.check(0.0, &[big(1)]).is_err());
    }

    proptest! {
        /// Over any run of arrivals, what was admitted in any 60 s window is
        /// at most two minutes' worth (burst + rate), the GCRA bound.
        #[test]
        fn admitted_rate_is_bounded(per_minute in 1u32..200, gaps in proptest::collection::vec(0.0f64..2.0, 1..400)) {
            let l = Limiter::default();
            let mut now = 0.0;
            let mut admitted = Vec::new();
            for g in gaps {
                now += g;
                if l.check(now, &[rpm("k", per_minute)]).is_ok() {
                    admitted.push(now);
                }
            }
            for (i, &t) in admitted.iter().enumerate() {
                let in_window = admitted[i..].iter().take_while(|&&u| u < t + 60.0).count();
                prop_assert!(in_window as u32 <= 2 * per_minute);
            }
        }

        /// A refusal's retry-after is exact: waiting that long admits it.
        #[test]
        fn retry_after_is_honest(per_minute in 1u32..100, n in 1usize..300) {
            let l = Limiter::default();
            let mut now = 0.0;
            for _ in 0..n {
                match l.check(now, &[rpm("k", per_minute)]) {
                    Ok(()) => {}
                    Err(Limited { refusal: Refusal::RetryAfter(s), .. }) => {
                        now += s;
                        prop_assert!(l.check(now, &[rpm("k", per_minute)]).is_ok());
                    }
                    Err(e) => prop_assert!(false, "{e:?}"),
                }
            }
        }
    }
}
