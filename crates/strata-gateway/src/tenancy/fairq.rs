//! Fair share under overload. While replicas have free slots a request goes
//! straight through; once they are full, requests wait in per-tenant queues
//! and the next free slot goes to the waiting tenant that has received the
//! least service so far, counted in weighted tokens (the Virtual Token Counter
//! of "Fairness in Serving Large Language Models", OSDI 2024). A tenant that
//! floods only lengthens its own queue.
//!
//! Batch work (`Class::Batch`) queues apart and takes only the slots
//! interactive work leaves: a free slot goes to a waiting batch request
//! only while no interactive one waits, and batch requests neither delay
//! interactive admission nor count as load for the autoscaler. When an
//! interactive request has to wait while batch requests hold slots, the
//! newest of those is preempted (`PREEMPT`: its runner drops the request,
//! freeing the slot at once, and runs it again later).
//!
//! A small reserved share of the slots (`gateway.batch_reserved_share`,
//! rounded down) goes to waiting batch requests first and is never
//! preempted, so that a batch still finishes within its window while
//! interactive load keeps every slot wanted. With no batch work waiting,
//! interactive requests use those slots like any other.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use strata_core::tenant::Priority;

use crate::fleet::replicas::Lane;
use crate::tenancy::FastMap;

/// Weight of a prompt token and of a generated one in the counters; decode
/// costs the engine far more per token than prefill.
pub const PROMPT_WEIGHT: f64 = 1.0;
pub const OUTPUT_WEIGHT: f64 = 2.0;

/// The counters, pure: which tenant goes next and how service is charged.
#[derive(Debug, Default, Clone)]
pub struct Vtc {
    counters: FastMap<String, f64>,
    /// Counter of the tenant served last, for lifting newcomers.
    last_served: f64,
}

impl Vtc {
    pub fn counter(&self, tenant: &str) -> f64 {
        self.counters.get(tenant).copied().unwrap_or(0.0)
    }

    /// A tenant with nothing queued starts waiting: lift its counter to the
    /// least counter among those already waiting (or, with none waiting, to
    /// the last one served), so idle time is not banked as credit.
    pub fn lift<'a>(&mut self, tenant: &str, waiting: impl Iterator<Item = &'a str>) {
        let floor = waiting
            .map(|t| self.counter(t))
            .fold(None, |m: Option<f64>, c| Some(m.map_or(c, |m| m.min(c))))
            .unwrap_or(self.last_served);
        let c = self.counters.entry(tenant.to_owned()).or_insert(0.0);
        *c = c.max(floor);
    }

    /// The waiting tenant (name, requests waiting) with the least service.
    /// A newcomer is lifted to exactly the least counter, so ties are common:
    /// they go to the tenant with fewer requests waiting, then by name.
    pub fn pick<'a>(&self, waiting: impl Iterator<Item = (&'a str, usize)>) -> Option<&'a str> {
        waiting
            .min_by(|(a, na), (b, nb)| {
                self.counter(a)
                    .total_cmp(&self.counter(b))
                    .then_with(|| na.cmp(nb))
                    .then_with(|| a.cmp(b))
            })
            .map(|(t, _)| t)
    }

    pub fn charge(&mut self, tenant: &str, service: f64) {
        let c = self.counters.entry(tenant.to_owned()).or_insert(0.0);
        *c += service;
        self.last_served = *c;
    }
}

tokio::task_local! {
    /// Set by whoever runs a batch request: cancelled when an interactive
    /// request needs its slot (the request is then dropped and re-run).
    pub static PREEMPT: CancellationToken;
}

/// Who goes first for a slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Class {
    /// A client waiting for its answer (the default).
    #[default]
    Interactive,
    /// A client of a sheddable key or tenant: a free slot but the last,
    /// or a refusal at once (`NoSlot::Shed`); it never waits.
    Sheddable,
    /// A line of a batch: only slots interactive work leaves.
    Batch,
}

impl Class {
    /// A client's class: sheddable where its key or its tenant is.
    pub fn of(key: Priority, tenant: Priority) -> Class {
        if key == Priority::Sheddable || tenant == Priority::Sheddable {
            Class::Sheddable
        } else {
            Class::Interactive
        }
    }
}

struct Waiter {
    cost: f64,
    tx: oneshot::Sender<FairPermit>,
    /// A batch request's `PREEMPT`, read in its own task.
    preempt: Option<CancellationToken>,
}

/// One class's waiting tenants and their fair-share counters.
#[derive(Default)]
struct Lanes {
    vtc: Vtc,
    queues: FastMap<String, VecDeque<Waiter>>,
}

impl Lanes {
    fn nobody_waits(&self) -> bool {
        self.queues.values().all(|q| q.is_empty())
    }

    fn waiting(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Queues a waiter in `tenant`'s queue (`NoSlot::QueueFull` past `max`).
    fn push(
        &mut self,
        tenant: &str,
        cost: f64,
        max: usize,
    ) -> Result<oneshot::Receiver<FairPermit>, NoSlot> {
        let Lanes { queues, vtc } = self;
        let mine = queues.entry(tenant.to_owned()).or_default();
        mine.retain(|w| !w.tx.is_closed());
        if mine.len() >= max {
            return Err(NoSlot::QueueFull);
        }
        if mine.is_empty() {
            let waiting: Vec<&str> = queues
                .iter()
                .filter(|(t, q)| !q.is_empty() && t.as_str() != tenant)
                .map(|(t, _)| t.as_str())
                .collect();
            vtc.lift(tenant, waiting.into_iter());
        }
        let (tx, rx) = oneshot::channel();
        queues
            .get_mut(tenant)
            .expect("inserted above")
            .push_back(Waiter {
                cost,
                tx,
                preempt: PREEMPT.try_with(CancellationToken::clone).ok(),
            });
        Ok(rx)
    }

    /// The least-served waiting tenant's next waiter.
    fn pop(&mut self) -> Option<(String, Waiter)> {
        let Lanes { queues, vtc } = self;
        let tenant = vtc
            .pick(
                queues
                    .iter()
                    .filter(|(_, w)| !w.is_empty())
                    .map(|(t, w)| (t.as_str(), w.len())),
            )?
            .to_owned();
        let waiter = queues
            .get_mut(&tenant)
            .and_then(VecDeque::pop_front)
            .expect("picked a non-empty queue");
        Some((tenant, waiter))
    }
}

struct State {
    capacity: usize,
    in_flight: usize,
    /// Of `in_flight`, the batch requests'.
    batch_in_flight: usize,
    interactive: Lanes,
    batch: Lanes,
    /// Running batch requests that can give their slot back, by permit
    /// number, oldest first.
    preemptible: Vec<(u64, CancellationToken)>,
    next_permit: u64,
    /// Share of `capacity` reserved for batch work that waits.
    batch_share: f64,
}

impl State {
    /// The slots batch and sheddable requests may fill: all but one kept
    /// free for the next interactive request (which then starts without
    /// preempting).
    fn spare_capacity(&self) -> usize {
        if self.capacity > 1 {
            self.capacity - 1
        } else {
            self.capacity
        }
    }

    /// A batch or sheddable request may take a slot now: one of the spare
    /// ones, while no interactive request waits.
    fn spare_free(&self) -> bool {
        self.in_flight < self.spare_capacity() && self.interactive.nobody_waits()
    }

    /// Slots held for batch requests: a share of the capacity, rounded
    /// down (a pool of fewer than 1/share slots reserves none).
    fn reserved(&self) -> usize {
        (self.capacity as f64 * self.batch_share).floor() as usize
    }

    /// A batch request may take a reserved slot now.
    fn reserve_free(&self) -> bool {
        self.batch_in_flight < self.reserved() && self.in_flight < self.capacity
    }

    fn lanes(&mut self, class: Class) -> &mut Lanes {
        match class {
            Class::Interactive | Class::Sheddable => &mut self.interactive,
            Class::Batch => &mut self.batch,
        }
    }
}

pub struct FairQueue {
    state: Mutex<State>,
    max_waiting_per_tenant: usize,
}

/// A slot on the replicas; released on drop.
pub struct FairPermit {
    queue: Option<Arc<FairQueue>>,
    tenant: String,
    class: Class,
    number: u64,
}

impl Drop for FairPermit {
    fn drop(&mut self) {
        if let Some(q) = self.queue.take() {
            let mut s = q.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            if self.class == Class::Batch {
                s.batch_in_flight = s.batch_in_flight.saturating_sub(1);
                s.preemptible.retain(|(n, _)| *n != self.number);
            }
            FairQueue::dispatch(&q, &mut s);
        }
    }
}

impl FairPermit {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn class(&self) -> Class {
        self.class
    }
}

/// Why a request got neither a slot nor a place in a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// The tenant already has as many requests waiting as it may.
    QueueFull,
    /// A sheddable request found no slot it may take.
    Shed,
}

/// Where an admitted request stood.
pub enum Admission {
    /// A slot was free.
    Now(FairPermit),
    /// Queued: the permit arrives when the tenant's turn comes.
    Wait(oneshot::Receiver<FairPermit>),
}

impl FairQueue {
    /// `batch_share` of the slots is kept for batch requests that wait.
    pub fn new(capacity: usize, max_waiting_per_tenant: usize, batch_share: f64) -> Arc<FairQueue> {
        Arc::new(FairQueue {
            state: Mutex::new(State {
                capacity,
                in_flight: 0,
                batch_in_flight: 0,
                interactive: Lanes::default(),
                batch: Lanes::default(),
                preemptible: Vec::new(),
                next_permit: 0,
                batch_share: batch_share.clamp(0.0, 1.0),
            }),
            max_waiting_per_tenant,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fair queue lock")
    }

    /// Takes a slot now, or a place in the tenant's queue of its class.
    /// Interactive requests pass batch ones waiting; a batch request takes
    /// a slot only when nobody waits at all, or a reserved one.
    pub fn admit(
        self: &Arc<Self>,
        tenant: &str,
        cost: f64,
        class: Class,
    ) -> Result<Admission, NoSlot> {
        let mut s = self.lock();
        let free = match class {
            Class::Interactive => s.in_flight < s.capacity && s.interactive.nobody_waits(),
            // Refused first: never a wait, never the last free slot.
            Class::Sheddable => {
                if !s.spare_free() {
                    return Err(NoSlot::Shed);
                }
                true
            }
            Class::Batch => s.batch.nobody_waits() && (s.reserve_free() || s.spare_free()),
        };
        if free {
            s.in_flight += 1;
            if class == Class::Batch {
                s.batch_in_flight += 1;
            }
            let lanes = s.lanes(class);
            lanes.vtc.lift(tenant, std::iter::empty());
            lanes.vtc.charge(tenant, cost);
            let preempt = PREEMPT.try_with(CancellationToken::clone).ok();
            return Ok(Admission::Now(self.permit(&mut s, tenant, class, preempt)));
        }
        let rx = s
            .lanes(class)
            .push(tenant, cost, self.max_waiting_per_tenant)?;
        if class == Class::Interactive {
            FairQueue::preempt(&mut s);
        }
        // Capacity may have grown while this one was being queued.
        FairQueue::dispatch(self, &mut s);
        Ok(Admission::Wait(rx))
    }

    /// Asks running batch requests for their slots back, the newest first,
    /// one for each interactive request waiting beyond those already asked,
    /// down to the reserved slots.
    fn preempt(s: &mut State) {
        let asked = s
            .preemptible
            .iter()
            .filter(|(_, t)| t.is_cancelled())
            .count();
        let beyond_reserve = s
            .batch_in_flight
            .saturating_sub(asked)
            .saturating_sub(s.reserved());
        let mut wanted = s
            .interactive
            .waiting()
            .saturating_sub(asked)
            .min(beyond_reserve);
        for (_, token) in s.preemptible.iter().rev() {
            if wanted == 0 {
                break;
            }
            if !token.is_cancelled() {
                token.cancel();
                wanted -= 1;
            }
        }
    }

    /// A permit for a slot just taken; a batch one can be preempted where
    /// its runner set `PREEMPT`.
    fn permit(
        self: &Arc<Self>,
        s: &mut State,
        tenant: &str,
        class: Class,
        preempt: Option<CancellationToken>,
    ) -> FairPermit {
        s.next_permit += 1;
        let number = s.next_permit;
        if let (Class::Batch, Some(token)) = (class, preempt) {
            s.preemptible.push((number, token));
        }
        FairPermit {
            queue: Some(self.clone()),
            tenant: tenant.to_owned(),
            class,
            number,
        }
    }

    /// Hands free slots to the least-served waiting tenants: batch ones to
    /// fill the reserve, then interactive ones, then batch ones only when
    /// no interactive request waits.
    fn dispatch(q: &Arc<FairQueue>, s: &mut State) {
        while s.in_flight < s.capacity {
            let reserved = if s.reserve_free() {
                s.batch.pop()
            } else {
                None
            };
            let (class, (tenant, waiter)) = match reserved {
                Some(next) => (Class::Batch, next),
                None => match s.interactive.pop() {
                    Some(next) => (Class::Interactive, next),
                    None if s.in_flight < s.spare_capacity() => match s.batch.pop() {
                        Some(next) => (Class::Batch, next),
                        None => break,
                    },
                    None => break,
                },
            };
            match waiter.tx.send(q.permit(s, &tenant, class, waiter.preempt)) {
                Ok(()) => {
                    s.in_flight += 1;
                    if class == Class::Batch {
                        s.batch_in_flight += 1;
                    }
                    s.lanes(class).vtc.charge(&tenant, waiter.cost);
                }
                // The client gave up while waiting: nothing to charge, and the
                // returned permit must not release a slot it never held.
                Err(mut permit) => {
                    permit.queue = None;
                    s.preemptible.retain(|(n, _)| *n != permit.number);
                }
            }
        }
        s.interactive.queues.retain(|_, q| !q.is_empty());
        s.batch.queues.retain(|_, q| !q.is_empty());
    }

    /// Sets how many requests the replicas take at once and fills new slots.
    pub fn set_capacity(self: &Arc<Self>, capacity: usize) {
        let mut s = self.lock();
        s.capacity = capacity;
        FairQueue::dispatch(self, &mut s);
    }

    /// Corrects a tenant's counter once a request's real size is known.
    pub fn settle(&self, tenant: &str, class: Class, delta: f64) {
        let mut s = self.lock();
        let c = s
            .lanes(class)
            .vtc
            .counters
            .entry(tenant.to_owned())
            .or_insert(0.0);
        *c = (*c + delta).max(0.0);
    }

    /// Interactive service the tenant has been counted for so far.
    pub fn counter(&self, tenant: &str) -> f64 {
        self.lock().interactive.vtc.counter(tenant)
    }

    /// Interactive requests waiting, over all tenants (batch requests
    /// waiting are no one's latency: they are not load to scale for).
    pub fn waiting(&self) -> usize {
        self.lock().interactive.waiting()
    }

    /// Batch requests waiting for a slot interactive work leaves.
    pub fn batch_waiting(&self) -> usize {
        self.lock().batch.waiting()
    }

    /// Interactive requests holding a slot, interactive requests waiting,
    /// and batch requests holding or waiting for a slot, read at once.
    fn counts(&self) -> (usize, usize, usize) {
        let s = self.lock();
        (
            s.in_flight - s.batch_in_flight,
            s.interactive.waiting(),
            s.batch_in_flight + s.batch.waiting(),
        )
    }

    /// Interactive requests holding a slot.
    pub fn in_flight(&self) -> usize {
        let s = self.lock();
        s.in_flight - s.batch_in_flight
    }

    /// Batch requests holding a slot.
    pub fn batch_in_flight(&self) -> usize {
        self.lock().batch_in_flight
    }
}

/// One fair queue per replica pool: the shared pool and each dedicated
/// tenant's, per model where each model has a pool of its own, each sized
/// by its own ready replicas.
pub struct Pools {
    queues: Mutex<FastMap<Lane, Arc<FairQueue>>>,
    max_waiting_per_tenant: usize,
    batch_share: f64,
}

impl Pools {
    pub fn new(max_waiting_per_tenant: usize, batch_share: f64) -> Pools {
        Pools {
            queues: Mutex::new(FastMap::default()),
            max_waiting_per_tenant,
            batch_share,
        }
    }

    /// The queue of `pool` (a dedicated tenant's, `None`: the shared one)
    /// for `model`'s pool (`None`: no model's in particular), made with
    /// `capacity` slots on first use.
    pub fn queue(
        &self,
        pool: Option<&str>,
        model: Option<&str>,
        capacity: impl FnOnce() -> usize,
    ) -> Arc<FairQueue> {
        let mut queues = self.queues.lock().expect("pools lock");
        queues
            .entry((pool.map(str::to_owned), model.map(str::to_owned)))
            .or_insert_with(|| {
                FairQueue::new(capacity(), self.max_waiting_per_tenant, self.batch_share)
            })
            .clone()
    }

    /// Interactive requests holding a slot and waiting, over every pool:
    /// the load the autoscaler reads.
    pub fn load(&self) -> (usize, usize) {
        let (in_flight, waiting, _) = self.load_of(None);
        (in_flight, waiting)
    }

    /// As `load`, over the queues of `model`'s pool only (`None`: every
    /// queue), and the batch requests holding or waiting for a slot there
    /// (reported apart: they keep a pool at one replica, and are not load).
    pub fn load_of(&self, model: Option<&str>) -> (usize, usize, usize) {
        let queues = self.queues.lock().expect("pools lock");
        queues
            .iter()
            .filter(|((_, m), _)| model.is_none() || m.as_deref() == model)
            .fold((0, 0, 0), |(f, w, b), (_, q)| {
                let (qf, qw, qb) = q.counts();
                (f + qf, w + qw, b + qb)
            })
    }

    /// Sets every known pool's capacity from its ready replicas.
    pub fn set_capacities(&self, ready: &HashMap<Lane, usize>, slots_per_replica: usize) {
        let queues: Vec<(Lane, Arc<FairQueue>)> = self
            .queues
            .lock()
            .expect("pools lock")
            .iter()
            .map(|(p, q)| (p.clone(), q.clone()))
            .collect();
        for (pool, q) in queues {
            q.set_capacity(ready.get(&pool).copied().unwrap_or(0) * slots_per_replica);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn a_flooding_tenant_waits_behind_a_light_one() {
        let q = FairQueue::new(1, 100, 0.0);
        let Admission::Now(first) = q.admit("a", 10.0, Class::Interactive).unwrap() else {
            panic!("slot was free")
        };
        let mut a_waits = Vec::new();
        for _ in 0..20 {
            match q.admit("a", 10.0, Class::Interactive).unwrap() {
                Admission::Wait(rx) => a_waits.push(rx),
                Admission::Now(_) => panic!("no slot is free"),
            }
        }
        let Admission::Wait(b) = q.admit("b", 10.0, Class::Interactive).unwrap() else {
            panic!("no slot is free")
        };
        drop(first);
        // b has received no service, so it goes before a's 20 waiting requests.
        let b_permit = b.await.unwrap();
        assert_eq!(b_permit.tenant(), "b");
        assert_eq!(q.waiting(), 20);
        drop(b_permit);
        let next = a_waits.remove(0).await.unwrap();
        assert_eq!(next.tenant(), "a");
    }

    #[tokio::test]
    async fn queues_are_bounded_and_cancelled_waiters_free_their_place() {
        let q = FairQueue::new(0, 2, 0.0);
        let w1 = q.admit("a", 1.0, Class::Interactive).unwrap();
        let _w2 = q.admit("a", 1.0, Class::Interactive).unwrap();
        assert!(matches!(
            q.admit("a", 1.0, Class::Interactive),
            Err(NoSlot::QueueFull)
        ));
        let _b = q
            .admit("b", 1.0, Class::Interactive)
            .expect("another tenant has its own queue");
        drop(w1);
        let _w3 = q
            .admit("a", 1.0, Class::Interactive)
            .expect("the dropped waiter's place is free again");
        q.set_capacity(10);
        assert_eq!(
            q.in_flight(),
            3,
            "the three live waiters got slots, the dropped one did not"
        );
        assert_eq!(q.waiting(), 0);
    }

    #[tokio::test]
    async fn batch_work_takes_only_the_slots_interactive_work_leaves() {
        let q = FairQueue::new(3, 100, 0.0);
        let Admission::Now(_i1) = q.admit("a", 1.0, Class::Interactive).unwrap() else {
            panic!("slot was free")
        };
        let Admission::Now(b1) = q.admit("b", 1.0, Class::Batch).unwrap() else {
            panic!("a free slot takes batch work")
        };
        assert_eq!((q.in_flight(), q.batch_in_flight()), (1, 1));
        // The last free slot is kept for interactive work.
        let Admission::Now(i0) = q.admit("a", 1.0, Class::Interactive).unwrap() else {
            panic!("the slot batch work leaves")
        };
        // Full: a batch request and then an interactive one wait; the slot
        // the batch line frees goes to the interactive one, though it came
        // second.
        let Admission::Wait(b2) = q.admit("b", 1.0, Class::Batch).unwrap() else {
            panic!("no slot is free")
        };
        let Admission::Wait(i2) = q.admit("c", 1.0, Class::Interactive).unwrap() else {
            panic!("no slot is free")
        };
        assert_eq!((q.waiting(), q.batch_waiting()), (1, 1));
        drop(b1);
        // A permit handed to the wrong waiter never reaches this one: fail,
        // do not hang.
        let soon = |rx| tokio::time::timeout(std::time::Duration::from_secs(1), rx);
        let i2 = soon(i2)
            .await
            .expect("the interactive waiter got the slot")
            .unwrap();
        assert_eq!(i2.tenant(), "c");
        assert_eq!(q.batch_waiting(), 1, "the batch request still waits");
        drop(i2);
        // One slot free: kept for interactive work; two: one for batch.
        assert_eq!(q.batch_waiting(), 1);
        drop(i0);
        let b2 = soon(b2).await.expect("then the batch waiter").unwrap();
        assert_eq!(b2.tenant(), "b");
        // With a batch request waiting, an interactive one still goes first
        // through a free slot; a batch one queues behind the waiting one.
        let q = FairQueue::new(1, 100, 0.0);
        let Admission::Now(_held) = q.admit("x", 1.0, Class::Interactive).unwrap() else {
            panic!("slot was free")
        };
        let _waiting_batch = q.admit("b", 1.0, Class::Batch).unwrap();
        q.set_capacity(3);
        assert!(matches!(
            q.admit("b", 1.0, Class::Batch).unwrap(),
            Admission::Wait(_)
        ));
    }

    #[tokio::test]
    async fn an_interactive_request_that_must_wait_preempts_the_newest_batch_request() {
        let q = FairQueue::new(3, 100, 0.0);
        let (t1, t2) = (CancellationToken::new(), CancellationToken::new());
        let batch = |t: &CancellationToken| {
            PREEMPT.sync_scope(t.clone(), || q.admit("b", 1.0, Class::Batch))
        };
        let Admission::Now(_b1) = batch(&t1).unwrap() else {
            panic!("slot was free")
        };
        let Admission::Now(b2) = batch(&t2).unwrap() else {
            panic!("slot was free")
        };
        // The slot batch work leaves free takes an interactive request
        // without preempting anything.
        let Admission::Now(_i0) = q.admit("i", 1.0, Class::Interactive).unwrap() else {
            panic!("the slot batch work leaves")
        };
        assert!(!t1.is_cancelled() && !t2.is_cancelled());
        let Admission::Wait(i1) = q.admit("i", 1.0, Class::Interactive).unwrap() else {
            panic!("no slot is free")
        };
        assert!(
            t2.is_cancelled() && !t1.is_cancelled(),
            "the newest batch request is asked"
        );
        // Its runner drops the request: the slot goes to the interactive one.
        drop(b2);
        let i1 = tokio::time::timeout(std::time::Duration::from_secs(1), i1)
            .await
            .expect("the freed slot went to the interactive request")
            .unwrap();
        assert_eq!((i1.tenant(), q.batch_in_flight()), ("i", 1));
        // Another interactive request asks the other batch request.
        let _i2 = q.admit("j", 1.0, Class::Interactive).unwrap();
        assert!(t1.is_cancelled());
        // Interactive requests never preempt each other.
        let q = FairQueue::new(1, 100, 0.0);
        let t = CancellationToken::new();
        let _i = PREEMPT.sync_scope(t.clone(), || q.admit("i", 1.0, Class::Interactive));
        let _j = q.admit("j", 1.0, Class::Interactive).unwrap();
        assert!(!t.is_cancelled());
    }

    #[tokio::test]
    async fn the_reserved_share_keeps_batch_work_going_under_constant_interactive_load() {
        // 8 slots, a quarter reserved: 2 for batch work that waits.
        let q = FairQueue::new(8, 100, 0.25);
        let soon = |rx| tokio::time::timeout(std::time::Duration::from_secs(1), rx);
        let mut interactive: Vec<FairPermit> = (0..8)
            .map(
                |i| match q.admit(&format!("i{i}"), 1.0, Class::Interactive).unwrap() {
                    Admission::Now(p) => p,
                    Admission::Wait(_) => panic!("slot was free"),
                },
            )
            .collect();
        // Full of interactive work: with nothing waiting the reserve is not
        // held back. Now batch work and more interactive work wait.
        let tokens: Vec<CancellationToken> = (0..3).map(|_| CancellationToken::new()).collect();
        let mut batch: Vec<_> = tokens
            .iter()
            .map(|t| {
                let Admission::Wait(rx) = PREEMPT
                    .sync_scope(t.clone(), || q.admit("b", 1.0, Class::Batch))
                    .unwrap()
                else {
                    panic!("no slot is free")
                };
                rx
            })
            .collect();
        let mut waiting: Vec<_> = (0..4)
            .map(
                |i| match q.admit(&format!("w{i}"), 1.0, Class::Interactive).unwrap() {
                    Admission::Wait(rx) => rx,
                    Admission::Now(_) => panic!("no slot is free"),
                },
            )
            .collect();
        // Freed slots fill the reserve first, though interactive work waits.
        drop(interactive.pop());
        let b0 = soon(batch.remove(0))
            .await
            .expect("a reserved slot")
            .unwrap();
        drop(interactive.pop());
        let b1 = soon(batch.remove(0))
            .await
            .expect("a reserved slot")
            .unwrap();
        assert_eq!(q.batch_in_flight(), 2);
        // Another interactive request that must wait asks no reserved slot back.
        match q.admit("w9", 1.0, Class::Interactive).unwrap() {
            Admission::Wait(rx) => waiting.push(rx),
            Admission::Now(_) => panic!("no slot is free"),
        }
        // The reserve is full: the next slot goes to interactive work, and
        // waiting interactive requests preempt nothing inside the reserve.
        drop(interactive.pop());
        let w0 = soon(waiting.remove(0))
            .await
            .expect("interactive next")
            .unwrap();
        assert_eq!(w0.class(), Class::Interactive);
        assert!(
            tokens.iter().all(|t| !t.is_cancelled()),
            "the reserve is never preempted"
        );
        assert_eq!(q.batch_waiting(), 1);
        // A reserved slot freed goes to the batch request waiting.
        drop(b0);
        let b2 = soon(batch.remove(0))
            .await
            .expect("the reserve again")
            .unwrap();
        assert_eq!((b2.class(), q.batch_in_flight()), (Class::Batch, 2));
        drop(b1);
        drop(b2);
        drop(interactive.pop());
        drop(interactive.pop());
        // With no batch work waiting, interactive requests use every slot.
        for rx in waiting.drain(..) {
            let p = soon(rx).await.expect("a slot").unwrap();
            assert_eq!(p.class(), Class::Interactive);
            interactive.push(p);
        }
        assert_eq!((q.in_flight(), q.batch_in_flight()), (8, 0));
        assert_eq!(interactive.len(), 7);
        // Below 1/share slots nothing is reserved.
        let q = FairQueue::new(3, 100, 0.25);
        let mut all: Vec<_> = (0..3)
            .map(|_| q.admit("i", 1.0, Class::Interactive).unwrap())
            .collect();
        let Admission::Wait(w) = q.admit("i", 1.0, Class::Interactive).unwrap() else {
            panic!("no slot is free")
        };
        let _b = q.admit("b", 1.0, Class::Batch).unwrap();
        drop(all.pop());
        soon(w)
            .await
            .expect("the interactive waiter goes first")
            .unwrap();
        assert_eq!((q.batch_in_flight(), q.batch_waiting()), (0, 1));
    }

    #[test]
    fn sheddable_requests_are_refused_first_and_never_wait() {
        let q = FairQueue::new(3, 100, 0.0);
        let shed = |q: &Arc<FairQueue>| q.admit("s", 1.0, Class::Sheddable);
        // Free slots but the last one take sheddable requests.
        let Ok(Admission::Now(s1)) = shed(&q) else {
            panic!("a free slot")
        };
        let Ok(Admission::Now(_s2)) = shed(&q) else {
            panic!("a free slot")
        };
        assert_eq!(q.in_flight(), 2);
        // The last free slot is kept for interactive work.
        assert!(matches!(shed(&q), Err(NoSlot::Shed)));
        let Ok(Admission::Now(_i)) = q.admit("i", 1.0, Class::Interactive) else {
            panic!("the last slot")
        };
        // Full: an interactive request waits its turn, a sheddable one is
        // refused at once, and still is while anyone waits.
        let Ok(Admission::Wait(_w)) = q.admit("j", 1.0, Class::Interactive) else {
            panic!("no slot is free")
        };
        assert!(matches!(shed(&q), Err(NoSlot::Shed)));
        drop(s1);
        assert!(matches!(shed(&q), Err(NoSlot::Shed)));
        assert_eq!(q.waiting(), 0, "the freed slot went to the waiting request");
        // Sheddable is the class of a key or a tenant set to it.
        use Priority::{Interactive as I, Sheddable as S};
        assert_eq!(Class::of(I, I), Class::Interactive);
        assert_eq!(Class::of(S, I), Class::Sheddable);
        assert_eq!(Class::of(I, S), Class::Sheddable);
    }

    proptest! {
        /// Two tenants that both always have work waiting receive service
        /// within one request's cost of each other, whatever the sizes.
        #[test]
        fn backlogged_tenants_stay_within_one_request(costs in proptest::collection::vec((1.0f64..500.0, any::<bool>()), 1..300)) {
            let mut v = Vtc::default();
            let (mut served_a, mut served_b) = (0.0, 0.0);
            let max = costs.iter().map(|c| c.0).fold(0.0, f64::max);
            for (cost, _) in &costs {
                let next = v.pick([("a", 1), ("b", 1)].into_iter()).unwrap();
                v.charge(next, *cost);
                if next == "a" { served_a += cost } else { served_b += cost }
                prop_assert!((served_a - served_b).abs() <= max + 1e-9);
            }
        }

        /// A tenant arriving after an idle spell cannot claim more than the
        /// least-served waiting tenant has had.
        #[test]
        fn idle_time_is_not_banked(charges in proptest::collection::vec(1.0f64..100.0, 1..50)) {
            let mut v = Vtc::default();
            for c in &charges { v.charge("busy", *c); }
            v.lift("late", ["busy"].into_iter());
            prop_assert!(v.counter("late") >= v.counter("busy") - 1e-9);
        }
    }
}
