//! The instance planner, kept pure: the replicas to run for a token demand,
//! at least cost, from a catalog of offers (instance type × zone × spot or
//! on-demand, with $/hour and the model's tokens/s on it) and the zones
//! where spot capacity can be had right now.
//!
//! Spot hedging (SpotHedge, "SkyServe", EuroSys 2025): spot replicas are
//! spread over the zones that have spot, plus `spot_hedge` extra spot
//! replicas against preemption; what the zones' spot room cannot carry,
//! on-demand replicas carry; when spot returns the plan goes back to spot,
//! and `diff` launches the spot replicas before it lets the on-demand ones go.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

pub use strata_core::config::CapacityType as Capacity;

/// One way to get a replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Offer {
    pub instance_type: String,
    pub zone: String,
    pub capacity: Capacity,
    pub price_per_hour: f64,
    /// The model's tokens per second on one replica of this type.
    pub tokens_per_s: f64,
}

impl Offer {
    /// A catalog offering with its type's tokens/s when a share
    /// `prompt_share` of the tokens are prompt tokens.
    pub fn priced(
        o: &strata_core::config::Offering,
        t: &strata_core::config::InstanceType,
        prompt_share: f64,
    ) -> Self {
        Offer {
            instance_type: o.instance_type.clone(),
            zone: o.zone.clone(),
            capacity: o.capacity,
            price_per_hour: o.price_per_hour,
            tokens_per_s: t.tokens_per_s(prompt_share),
        }
    }

    /// Dollars per hour for each token per second it serves.
    pub fn dollars_per_token_rate(&self) -> f64 {
        self.price_per_hour / self.tokens_per_s.max(f64::MIN_POSITIVE)
    }
}

/// The offers of `capacity` (in `zone`, when given) that serve anything.
fn of_kind<'a, 'z>(
    offers: &'a [Offer],
    capacity: Capacity,
    zone: Option<&'z str>,
) -> impl Iterator<Item = &'a Offer> + 'z
where
    'a: 'z,
{
    offers
        .iter()
        .filter(move |o| o.capacity == capacity && o.tokens_per_s > 0.0)
        .filter(move |o| zone.is_none_or(|z| o.zone == z))
}

/// The offer of `capacity` (in `zone`, when given) that costs least per
/// token; the first of equals.
pub fn cheapest<'a>(
    offers: &'a [Offer],
    capacity: Capacity,
    zone: Option<&str>,
) -> Option<&'a Offer> {
    of_kind(offers, capacity, zone).min_by(|a, b| {
        a.dollars_per_token_rate()
            .total_cmp(&b.dollars_per_token_rate())
    })
}

/// The offer of `capacity` (in `zone`, when given) whose whole replicas
/// serve `need` tokens/s alone for least, with how many (at least one);
/// the first of equals.
pub fn cheapest_alone<'a>(
    offers: &'a [Offer],
    capacity: Capacity,
    zone: Option<&str>,
    need: f64,
) -> Option<(&'a Offer, u32)> {
    let count = |o: &Offer| (need.max(0.0) / o.tokens_per_s).ceil().max(1.0) as u32;
    let cost = |o: &Offer| f64::from(count(o)) * o.price_per_hour;
    of_kind(offers, capacity, zone)
        .min_by(|a, b| cost(a).total_cmp(&cost(b)))
        .map(|o| (o, count(o)))
}

/// The least-cost whole replicas of `capacity` (in `zone`, when given)
/// that serve `need` tokens/s: full replicas of the offer that costs least
/// per token, and what is left by whichever offer covers it alone for the
/// least (a big machine that is cheapest per token is no bargain when it
/// would run a quarter full). At least one replica, the cheapest per hour,
/// for a need of zero or less.
pub fn cover<'a>(
    offers: &'a [Offer],
    capacity: Capacity,
    zone: Option<&str>,
    need: f64,
) -> Vec<&'a Offer> {
    let Some(best) = cheapest(offers, capacity, zone) else {
        return Vec::new();
    };
    let full = (need.max(0.0) / best.tokens_per_s).floor();
    let left = need - full * best.tokens_per_s;
    let mut out = vec![best; full as usize];
    if left > 1e-9 * need.abs().max(1.0) || out.is_empty() {
        if let Some((o, n)) = cheapest_alone(offers, capacity, zone, left) {
            out.extend(std::iter::repeat_n(o, n as usize));
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlanPolicy {
    pub allow_spot: bool,
    pub allow_on_demand: bool,
    /// Extra spot replicas beyond the demand, against preemption.
    pub spot_hedge: u32,
    /// Never fewer replicas than this while there is demand.
    pub min_replicas: u32,
    /// Spot goes first to the zones within this share of the cheapest
    /// zone's cost per token, spread evenly; dearer zones only take what
    /// those have no room for.
    pub spot_zone_premium: f64,
    /// Spot replicas running now, by zone: kept where the plan still wants
    /// spot there, so a cheaper zone coming back moves none of them.
    pub spot_held: BTreeMap<String, u32>,
    /// At most this share of the replicas in any one zone's spot (at least
    /// one): a zone reclaims all its spot at once, and with a launch
    /// slower than the notice the pool would stand empty for minutes;
    /// what no zone may take runs on demand.
    pub spot_max_zone_share: f64,
    /// Zones that reclaimed lately where a reclaim leaves a gap (the
    /// controller's `risky_zones`): each holds at most `spot_hedge` spot
    /// replicas, so that losing one of them costs no more than the hedge.
    pub spot_risky: BTreeSet<String>,
    /// On-demand offers that refused a launch lately (no capacity of the
    /// type in the zone): each holds at most this many replicas, and the
    /// rest goes to the other on-demand offers while there are any.
    pub on_demand_room: BTreeMap<Slot, u32>,
}

impl Default for PlanPolicy {
    fn default() -> Self {
        PlanPolicy {
            allow_spot: true,
            allow_on_demand: true,
            spot_hedge: 1,
            min_replicas: 1,
            spot_zone_premium: 0.25,
            spot_held: BTreeMap::new(),
            spot_max_zone_share: 1.0,
            spot_risky: BTreeSet::new(),
            on_demand_room: BTreeMap::new(),
        }
    }
}

/// A replica the plan wants: which offer, by its identifying fields.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Slot {
    pub instance_type: String,
    pub zone: String,
    pub capacity: Capacity,
}

impl From<&Offer> for Slot {
    fn from(o: &Offer) -> Self {
        Slot {
            instance_type: o.instance_type.clone(),
            zone: o.zone.clone(),
            capacity: o.capacity,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    pub replicas: Vec<Slot>,
    pub cost_per_hour: f64,
    /// Tokens per second the replicas serve, hedge included.
    pub tokens_per_s: f64,
}

/// Spot capacity by zone: `None` without a known limit, `Some(n)` for at
/// most `n` spot replicas there (0: none now).
pub type SpotRoom = BTreeMap<String, Option<u32>>;

/// Every zone of `zones` with spot and no known limit.
pub fn unlimited(zones: &BTreeSet<String>) -> SpotRoom {
    zones.iter().map(|z| (z.clone(), None)).collect()
}

/// The cheapest replicas that serve `needed` tokens/s. Spot where zones
/// have room (spread over them, the cheapest type per token in each,
/// each zone up to its room), on-demand (the cheapest type per token) for
/// what spot cannot carry. Zero demand: no replicas.
pub fn plan(needed: f64, offers: &[Offer], spot: &SpotRoom, policy: &PlanPolicy) -> Plan {
    if needed <= 0.0 {
        return Plan::default();
    }
    let mut chosen: Vec<&Offer> = Vec::new();
    let mut served = 0.0;
    if policy.allow_spot {
        // The cheapest spot offer of each zone with room, cheapest zone first.
        let mut zones: Vec<ZonePick> = spot
            .iter()
            .filter(|(_, room)| **room != Some(0))
            .filter_map(|(zone, room)| {
                Some(ZonePick {
                    offer: cheapest(offers, Capacity::Spot, Some(zone))?,
                    room: *room,
                    held: policy.spot_held.get(zone).copied().unwrap_or(0),
                    near: false,
                    taken: 0,
                })
            })
            .collect();
        zones.sort_by(|a, b| {
            a.offer
                .dollars_per_token_rate()
                .total_cmp(&b.offer.dollars_per_token_rate())
        });
        let limit = zones.first().map_or(0.0, |z| {
            z.offer.dollars_per_token_rate() * (1.0 + policy.spot_zone_premium)
        });
        // A share below 1 caps each zone at that share of the replicas the
        // plan will hold, counted in the cheapest zone's size (at 1 nothing
        // is capped: a zone of smaller replicas may need more than that).
        let cap = zones
            .first()
            .filter(|_| policy.spot_max_zone_share < 1.0)
            .map(|z| {
                let units = (needed / z.offer.tokens_per_s)
                    .ceil()
                    .max(f64::from(policy.min_replicas))
                    + f64::from(policy.spot_hedge);
                (units * policy.spot_max_zone_share.max(0.0))
                    .ceil()
                    .max(1.0) as u32
            });
        for z in &mut zones {
            z.near = z.offer.dollars_per_token_rate() <= limit;
            let risky = policy
                .spot_risky
                .contains(&z.offer.zone)
                .then_some(policy.spot_hedge);
            for cap in [cap, risky].into_iter().flatten() {
                z.room = Some(z.room.map_or(cap, |r| r.min(cap)));
            }
        }
        while served < needed || (chosen.len() as u32) < policy.min_replicas {
            let Some(o) = next_zone(&mut zones) else {
                break;
            };
            served += o.tokens_per_s;
            chosen.push(o);
        }
        if served >= needed {
            for _ in 0..policy.spot_hedge {
                if let Some(o) = next_zone(&mut zones) {
                    chosen.push(o);
                }
            }
        }
    }
    let short = served < needed || (chosen.len() as u32) < policy.min_replicas;
    if short && policy.allow_on_demand {
        let fill = cover_on_demand(offers, &policy.on_demand_room, needed - served);
        let pad = (policy.min_replicas as usize).saturating_sub(chosen.len() + fill.len());
        if let Some(&small) = fill.last() {
            chosen.extend(fill.iter().copied());
            chosen.extend(std::iter::repeat_n(small, pad));
        }
    }
    Plan {
        cost_per_hour: chosen.iter().map(|o| o.price_per_hour).sum(),
        tokens_per_s: chosen.iter().map(|o| o.tokens_per_s).sum(),
        replicas: chosen.into_iter().map(Slot::from).collect(),
    }
}

/// `cover` on demand, where the offers of `room` hold at most their count:
/// those take what they may first (replicas running there stay), cheapest
/// per token first, and the other offers cover the rest. With no other
/// on-demand offer, the rest goes where `cover` puts it (on demand is the
/// last resort: better to try again than to serve nothing).
fn cover_on_demand<'a>(
    offers: &'a [Offer],
    room: &BTreeMap<Slot, u32>,
    need: f64,
) -> Vec<&'a Offer> {
    if room.is_empty() {
        return cover(offers, Capacity::OnDemand, None, need);
    }
    let capped = |o: &Offer| room.get(&Slot::from(o)).copied();
    let mut held: Vec<&Offer> = of_kind(offers, Capacity::OnDemand, None)
        .filter(|o| capped(o).is_some())
        .collect();
    held.sort_by(|a, b| {
        a.dollars_per_token_rate()
            .total_cmp(&b.dollars_per_token_rate())
    });
    let free: Vec<Offer> = of_kind(offers, Capacity::OnDemand, None)
        .filter(|o| capped(o).is_none())
        .cloned()
        .collect();
    if free.is_empty() {
        return cover(offers, Capacity::OnDemand, None, need);
    }
    let mut out = Vec::new();
    let mut left = need;
    let covered = |left: f64| left <= 1e-9 * need.abs().max(1.0);
    for o in held {
        for _ in 0..capped(o).unwrap_or(0) {
            if covered(left) {
                break;
            }
            out.push(o);
            left -= o.tokens_per_s;
        }
    }
    if !covered(left) || out.is_empty() {
        // The same offers as `offers` holds them, by slot.
        for o in cover(&free, Capacity::OnDemand, None, left) {
            let slot = Slot::from(o);
            if let Some(same) = offers.iter().find(|x| Slot::from(*x) == slot) {
                out.push(same);
            }
        }
    }
    out
}

/// A zone's cheapest spot offer while a plan is made.
struct ZonePick<'a> {
    offer: &'a Offer,
    room: Option<u32>,
    /// Spot replicas running there now.
    held: u32,
    /// Within the premium of the cheapest zone.
    near: bool,
    taken: u32,
}

/// The zone for the next spot replica, taking one: zones within the
/// premium before dearer ones; there, one that keeps a replica already
/// running (none moves for a saving within the premium) before one that
/// needs a launch; then the zone with the fewest taken (an even spread),
/// the cheapest of equals. `None` when no zone has room left.
fn next_zone<'a>(zones: &mut [ZonePick<'a>]) -> Option<&'a Offer> {
    let z = zones
        .iter_mut()
        .filter(|z| z.room.is_none_or(|r| z.taken < r))
        .enumerate()
        .min_by_key(|(i, z)| (!z.near, z.taken >= z.held, z.taken, *i))
        .map(|(_, z)| z)?;
    z.taken += 1;
    Some(z.offer)
}

/// What to change to go from `running` to `target`: replicas to launch,
/// and replicas to let go. Matching replicas are kept. While replicas are
/// being launched, the ones to go stay until the new ones are ready
/// (`launch` non-empty means: terminate only after those are up).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Change {
    pub launch: Vec<Slot>,
    pub terminate: Vec<Slot>,
}

pub fn diff(running: &[Slot], target: &Plan) -> Change {
    let mut want: BTreeMap<&Slot, i64> = BTreeMap::new();
    for s in &target.replicas {
        *want.entry(s).or_default() += 1;
    }
    let mut have: BTreeMap<&Slot, i64> = BTreeMap::new();
    for s in running {
        *have.entry(s).or_default() += 1;
    }
    let mut change = Change::default();
    for (slot, n) in &want {
        let extra = n - have.get(slot).copied().unwrap_or(0);
        change
            .launch
            .extend(std::iter::repeat_n((*slot).clone(), extra.max(0) as usize));
    }
    for (slot, n) in &have {
        let extra = n - want.get(slot).copied().unwrap_or(0);
        change
            .terminate
            .extend(std::iter::repeat_n((*slot).clone(), extra.max(0) as usize));
    }
    change
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offer(t: &str, zone: &str, cap: Capacity, price: f64, tps: f64) -> Offer {
        Offer {
            instance_type: t.into(),
            zone: zone.into(),
            capacity: cap,
            price_per_hour: price,
            tokens_per_s: tps,
        }
    }

    /// Two GPU types in three zones; spot at about a third of on-demand.
    fn catalog() -> Vec<Offer> {
        let mut c = Vec::new();
        for zone in ["a", "b", "c"] {
            c.push(offer("l4", zone, Capacity::OnDemand, 0.80, 1000.0));
            c.push(offer("a100", zone, Capacity::OnDemand, 3.70, 4000.0));
            c.push(offer("l4", zone, Capacity::Spot, 0.30, 1000.0));
            c.push(offer("a100", zone, Capacity::Spot, 1.40, 4000.0));
        }
        c
    }

    fn zones(z: &[&str]) -> SpotRoom {
        z.iter().map(|s| (s.to_string(), None)).collect()
    }

    #[test]
    fn spot_is_spread_over_zones_with_a_hedge() {
        let p = plan(
            3500.0,
            &catalog(),
            &zones(&["a", "b", "c"]),
            &PlanPolicy::default(),
        );
        assert!(p
            .replicas
            .iter()
            .all(|s| s.capacity == Capacity::Spot && s.instance_type == "l4"));
        assert_eq!(p.replicas.len(), 5, "4 for 3,500 tokens/s, 1 hedge");
        let used: BTreeSet<&str> = p.replicas.iter().map(|s| s.zone.as_str()).collect();
        assert_eq!(used.len(), 3);
        assert!((p.cost_per_hour - 1.5).abs() < 1e-9);
    }

    #[test]
    fn no_spot_anywhere_falls_back_to_on_demand_and_back_again() {
        let policy = PlanPolicy::default();
        let spot = plan(3500.0, &catalog(), &zones(&["a", "b", "c"]), &policy);
        let fallback = plan(3500.0, &catalog(), &zones(&[]), &policy);
        assert!(fallback
            .replicas
            .iter()
            .all(|s| s.capacity == Capacity::OnDemand));
        assert!(fallback.tokens_per_s >= 3500.0);
        let to_on_demand = diff(&spot.replicas, &fallback);
        assert_eq!(to_on_demand.launch.len(), fallback.replicas.len());
        assert_eq!(to_on_demand.terminate.len(), spot.replicas.len());
        // Spot returns: launch spot, let the on-demand ones go.
        let back = diff(&fallback.replicas, &spot);
        assert!(back.launch.iter().all(|s| s.capacity == Capacity::Spot));
        assert!(back
            .terminate
            .iter()
            .all(|s| s.capacity == Capacity::OnDemand));
        // The hedged spot plan still costs well under on-demand.
        assert!(
            spot.cost_per_hour < 0.5 * fallback.cost_per_hour,
            "{} vs {}",
            spot.cost_per_hour,
            fallback.cost_per_hour
        );
    }

    #[test]
    fn a_preemption_storm_in_one_zone_moves_spot_to_the_others() {
        let policy = PlanPolicy::default();
        let before = plan(3500.0, &catalog(), &zones(&["a", "b", "c"]), &policy);
        let after = plan(3500.0, &catalog(), &zones(&["a", "c"]), &policy);
        assert!(after.replicas.iter().all(|s| s.zone != "b"));
        let change = diff(&before.replicas, &after);
        assert!(change.terminate.iter().all(|s| s.zone == "b"), "{change:?}");
        assert!(change.launch.iter().all(|s| s.zone != "b"));
    }

    #[test]
    fn on_demand_fills_what_the_spot_room_cannot_carry() {
        // 3,500 tokens/s = 4 l4 replicas; zone a has room for 1, b for 2, c none.
        let room: SpotRoom = [("a", Some(1)), ("b", Some(2)), ("c", Some(0))]
            .into_iter()
            .map(|(z, r)| (z.to_string(), r))
            .collect();
        let p = plan(3500.0, &catalog(), &room, &PlanPolicy::default());
        let spot: Vec<&str> = p
            .replicas
            .iter()
            .filter(|s| s.capacity == Capacity::Spot)
            .map(|s| s.zone.as_str())
            .collect();
        assert_eq!(spot.len(), 3, "{p:?}");
        assert_eq!(spot.iter().filter(|z| **z == "b").count(), 2);
        assert!(p.tokens_per_s >= 3500.0);
        assert!(p.replicas.iter().any(|s| s.capacity == Capacity::OnDemand));
    }

    #[test]
    fn a_big_machine_cheapest_per_token_is_bought_only_as_far_as_it_fills() {
        // Eight GPUs at $22/h for 40,000 tokens/s beat one at $1/h for
        // 1,700 per token, but not for 5,000 tokens/s: 3 small ones ($3)
        // instead of the big one ($22).
        let offers = [
            offer("big", "a", Capacity::OnDemand, 22.0, 40_000.0),
            offer("small", "a", Capacity::OnDemand, 1.0, 1_700.0),
        ];
        let no_spot = SpotRoom::new();
        let p = plan(5_000.0, &offers, &no_spot, &PlanPolicy::default());
        assert_eq!(p.replicas.len(), 3, "{p:?}");
        assert!(p.replicas.iter().all(|s| s.instance_type == "small"));
        assert!((p.cost_per_hour - 3.0).abs() < 1e-9);
        // 90,000 tokens/s: two big ones full, and the 10,000 left on six
        // small ones ($6) rather than a third big one ($22).
        let p = plan(90_000.0, &offers, &no_spot, &PlanPolicy::default());
        let big = p
            .replicas
            .iter()
            .filter(|s| s.instance_type == "big")
            .count();
        assert_eq!((big, p.replicas.len() - big), (2, 6), "{p:?}");
        // 38,000 tokens/s: the big one alone ($22) is cheaper than 23 small.
        let p = plan(38_000.0, &offers, &no_spot, &PlanPolicy::default());
        assert_eq!(p.replicas.len(), 1);
        assert_eq!(p.replicas[0].instance_type, "big");
    }

    #[test]
    fn no_demand_no_replicas_and_min_replicas_otherwise() {
        assert!(
            plan(0.0, &catalog(), &zones(&["a"]), &PlanPolicy::default())
                .replicas
                .is_empty()
        );
        let p = plan(
            1.0,
            &catalog(),
            &zones(&[]),
            &PlanPolicy {
                min_replicas: 2,
                ..PlanPolicy::default()
            },
        );
        assert_eq!(p.replicas.len(), 2);
    }

    #[test]
    fn spot_zones_dearer_than_the_premium_take_only_what_the_cheaper_ones_cannot() {
        let mut c = catalog();
        // Zone c's only spot is twice the price.
        c.retain(|o| !(o.zone == "c" && o.capacity == Capacity::Spot));
        c.push(offer("l4", "c", Capacity::Spot, 0.60, 1000.0));
        let p = plan(3500.0, &c, &zones(&["a", "b", "c"]), &PlanPolicy::default());
        let in_zone = |p: &Plan, z: &str| p.replicas.iter().filter(|s| s.zone == z).count();
        assert_eq!(
            (in_zone(&p, "a"), in_zone(&p, "b"), in_zone(&p, "c")),
            (3, 2, 0)
        );
        // a and b hold two each at most: c takes the rest.
        let room: SpotRoom = [("a", Some(2)), ("b", Some(2)), ("c", None)]
            .into_iter()
            .map(|(z, r)| (z.to_string(), r))
            .collect();
        let p = plan(3500.0, &c, &room, &PlanPolicy::default());
        assert_eq!(
            (in_zone(&p, "a"), in_zone(&p, "b"), in_zone(&p, "c")),
            (2, 2, 1)
        );
    }

    #[test]
    fn running_spot_replicas_stay_put_when_a_cheaper_zone_comes_back() {
        let mut c = catalog();
        // Zone a is 5% cheaper than b, within the premium.
        for o in &mut c {
            if o.zone == "a" && o.capacity == Capacity::Spot && o.instance_type == "l4" {
                o.price_per_hour = 0.285;
            }
        }
        let fresh = plan(3500.0, &c, &zones(&["a", "b"]), &PlanPolicy::default());
        let in_zone = |p: &Plan, z: &str| p.replicas.iter().filter(|s| s.zone == z).count();
        assert_eq!((in_zone(&fresh, "a"), in_zone(&fresh, "b")), (3, 2));
        // Four run in b (a was sold out): they stay; the hedge goes to a.
        let policy = PlanPolicy {
            spot_held: [("b".to_string(), 4)].into(),
            ..PlanPolicy::default()
        };
        let kept = plan(3500.0, &c, &zones(&["a", "b"]), &policy);
        assert_eq!((in_zone(&kept, "a"), in_zone(&kept, "b")), (1, 4));
        assert!(diff(&vec![Slot::from(&c[6]); 4], &kept)
            .terminate
            .is_empty());
    }

    #[test]
    fn an_on_demand_offer_that_refused_keeps_what_it_holds_and_the_rest_goes_elsewhere() {
        let c = catalog();
        let on_demand = PlanPolicy {
            allow_spot: false,
            spot_hedge: 0,
            ..PlanPolicy::default()
        };
        let in_zone = |p: &Plan, z: &str| p.replicas.iter().filter(|s| s.zone == z).count();
        // Three L4s on demand, all in the first of the equally priced zones.
        let fresh = plan(3000.0, &c, &SpotRoom::new(), &on_demand);
        assert_eq!(fresh.replicas.len(), 3);
        assert_eq!(in_zone(&fresh, "a"), 3);
        // Zone a's L4 refused a launch while it held one: that one stays,
        // the other two go to another zone's L4, not to a dearer type.
        let l4_a = Slot::from(&c[0]);
        let refused = PlanPolicy {
            on_demand_room: [(l4_a.clone(), 1)].into(),
            ..on_demand.clone()
        };
        let moved = plan(3000.0, &c, &SpotRoom::new(), &refused);
        assert_eq!(moved.replicas.len(), 3);
        assert_eq!(in_zone(&moved, "a"), 1);
        assert!(moved.replicas.iter().all(|s| s.instance_type == "l4"));
        assert!(diff(std::slice::from_ref(&l4_a), &moved)
            .terminate
            .is_empty());
        // Every on-demand offer refused: on demand is the last resort, so
        // the plan is as if none had.
        let everywhere = PlanPolicy {
            on_demand_room: c
                .iter()
                .filter(|o| o.capacity == Capacity::OnDemand)
                .map(|o| (Slot::from(o), 0))
                .collect(),
            ..on_demand.clone()
        };
        assert_eq!(plan(3000.0, &c, &SpotRoom::new(), &everywhere), fresh);
    }

    #[test]
    fn a_zone_share_cap_puts_what_one_zone_may_not_hold_on_demand() {
        let policy = PlanPolicy {
            spot_max_zone_share: 0.5,
            ..PlanPolicy::default()
        };
        // 4 replicas + 1 hedge planned: at most 3 in any one zone.
        let one = plan(3500.0, &catalog(), &zones(&["a"]), &policy);
        let spot = |p: &Plan| {
            p.replicas
                .iter()
                .filter(|s| s.capacity == Capacity::Spot)
                .count()
        };
        assert_eq!((spot(&one), one.replicas.len()), (3, 4));
        // With three zones the spread never reaches the cap.
        let three = plan(3500.0, &catalog(), &zones(&["a", "b", "c"]), &policy);
        assert_eq!((spot(&three), three.replicas.len()), (5, 5));
    }

    #[test]
    fn a_risky_zone_holds_at_most_the_hedge_and_what_no_calm_zone_takes_runs_on_demand() {
        let spot_in = |p: &Plan, z: &str| {
            p.replicas
                .iter()
                .filter(|s| s.capacity == Capacity::Spot && s.zone == z)
                .count()
        };
        // 4 replicas + 1 hedge over a and b; a reclaimed lately.
        let policy = PlanPolicy {
            spot_risky: ["a".to_string()].into(),
            ..PlanPolicy::default()
        };
        let two = plan(3500.0, &catalog(), &zones(&["a", "b"]), &policy);
        assert_eq!((spot_in(&two, "a"), spot_in(&two, "b")), (1, 4), "{two:?}");
        // a alone has room: one spot replica there (losing it costs a
        // hedge's worth), the rest of the demand on demand.
        let one = plan(3500.0, &catalog(), &zones(&["a"]), &policy);
        let on_demand = one
            .replicas
            .iter()
            .filter(|s| s.capacity == Capacity::OnDemand)
            .count();
        assert_eq!((spot_in(&one, "a"), on_demand), (1, 3), "{one:?}");
        // Without a hedge a risky zone holds no spot.
        let bare = PlanPolicy {
            spot_hedge: 0,
            ..policy.clone()
        };
        let none = plan(3500.0, &catalog(), &zones(&["a", "b"]), &bare);
        assert_eq!(spot_in(&none, "a"), 0, "{none:?}");
    }

    #[test]
    fn without_a_zone_share_cap_a_zone_of_smaller_replicas_takes_all_it_needs() {
        // Zone a: one a100 (4,000 tok/s), the cheapest per token; zone b:
        // l4 only (1,000 tok/s). 9,000 tok/s: the a100, then five l4 and
        // the hedge in b, all spot.
        let mut c: Vec<Offer> = catalog()
            .into_iter()
            .filter(|o| {
                o.capacity == Capacity::OnDemand || (o.zone == "a") == (o.instance_type == "a100")
            })
            .collect();
        for o in &mut c {
            if o.instance_type == "a100" && o.capacity == Capacity::Spot {
                o.price_per_hour = 1.0;
            }
        }
        let room: SpotRoom = [("a", Some(1)), ("b", None)]
            .into_iter()
            .map(|(z, r)| (z.to_string(), r))
            .collect();
        let p = plan(9000.0, &c, &room, &PlanPolicy::default());
        let in_b = p.replicas.iter().filter(|s| s.zone == "b").count();
        assert!(
            p.replicas.iter().all(|s| s.capacity == Capacity::Spot),
            "{p:?}"
        );
        assert_eq!((p.replicas.len(), in_b), (7, 6), "{p:?}");
    }

    proptest! {
        #[test]
        fn plans_meet_demand_only_where_allowed(
            needed in 1.0f64..50_000.0,
            spot in proptest::collection::btree_set(prop_oneof!["a", "b", "c"], 0..4),
            hedge in 0u32..3,
        ) {
            let policy = PlanPolicy { spot_hedge: hedge, ..PlanPolicy::default() };
            let p = plan(needed, &catalog(), &spot.iter().map(|s| (s.to_string(), None)).collect(), &policy);
            let hedge_tps = if spot.is_empty() { 0.0 } else { f64::from(hedge) * 4000.0 };
            prop_assert!(p.tokens_per_s >= needed, "{} < {}", p.tokens_per_s, needed);
            prop_assert!(p.tokens_per_s - hedge_tps < needed + 4000.0, "over-provisioned: {:?}", p);
            for s in &p.replicas {
                if s.capacity == Capacity::Spot {
                    prop_assert!(spot.contains(&s.zone));
                }
            }
            // Never dearer than serving it all on-demand with the cheapest type.
            let on_demand = plan(needed, &catalog(), &SpotRoom::new(), &policy);
            prop_assert!(p.cost_per_hour <= on_demand.cost_per_hour + f64::from(hedge) * 1.40 + 1e-9);
            // diff from nothing launches exactly the plan.
            prop_assert_eq!(diff(&[], &p).launch.len(), p.replicas.len());
        }
    }
}
