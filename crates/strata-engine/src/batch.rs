//! The batching policy, kept pure: which sequences decode, and how many prompt
//! tokens each prefilling sequence reads, in one step of the scheduler.

/// What the planner needs to know about one active sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// Prompt tokens not yet in the KV cache; 0 once the sequence decodes.
    pub unread_prompt: usize,
    /// Batch class: it works in what interactive sequences leave.
    pub batch: bool,
}

/// One step's work: indexes into the slot list.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Sequences that feed their last token and sample the next one.
    pub decode: Vec<usize>,
    /// Sequences that read this many prompt tokens.
    pub prefill: Vec<(usize, usize)>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.decode.is_empty() && self.prefill.is_empty()
    }

    pub fn tokens(&self) -> usize {
        self.decode.len() + self.prefill.iter().map(|p| p.1).sum::<usize>()
    }
}

/// How batch-class sequences share a step with interactive ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchShare {
    /// The most batch sequences that decode in a step beside interactive
    /// decoders (each makes the step, and so every interactive token, a
    /// little longer).
    pub beside: usize,
    /// This step is the batch's reserved turn: every sequence steps as if
    /// all were of one class, so a batch advances under constant
    /// interactive load.
    pub reserved_turn: bool,
    /// Which batch decoders get the places beside interactive work: the
    /// `beside` of them from this one on (the step count), so each takes
    /// its turn.
    pub rotation: usize,
}

/// Every 8th step that held batch work back is the batch's
/// (`BatchShare::reserved_turn`): the engine's side of the gateway's
/// reserved batch share.
pub const BATCH_TURN_EVERY: u64 = 8;

/// One step. Every decoding sequence gets its token each step, so running
/// streams never stall; prompts share `prefill_budget` tokens, so a long
/// prompt is read in chunks between decode steps (`plan_prefill`).
///
/// With interactive sequences present, batch ones take what they leave:
/// while an interactive prompt is read, nothing of a batch (its time to
/// first token is a step of its own work only); while interactive
/// sequences only decode, at most `share.beside` batch decoders beside
/// them and no batch prompt (a chunk of prompt would lengthen the step
/// every interactive token waits for). A reserved turn, or no interactive
/// sequence at all, plans every sequence alike.
pub fn plan_step(slots: &[SlotView], prefill_budget: usize, share: BatchShare) -> StepPlan {
    let interactive = slots.iter().any(|s| !s.batch);
    let classless = !interactive || share.reserved_turn;
    let mut plan = StepPlan::default();
    let mut waiting = Vec::new();
    let mut batch_decoders = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        match (s.unread_prompt, s.batch && !classless) {
            (0, false) => plan.decode.push(i),
            (0, true) => batch_decoders.push(i),
            (_, false) => waiting.push(i),
            // A batch prompt waits for a step without interactive work.
            (_, true) => {}
        }
    }
    // Batch decoders beside interactive ones only while none of them is
    // reading its prompt.
    if waiting.is_empty() && !batch_decoders.is_empty() {
        let from = share.rotation % batch_decoders.len();
        batch_decoders.rotate_left(from);
        batch_decoders.truncate(share.beside);
        plan.decode.extend(batch_decoders);
        plan.decode.sort_unstable();
    }
    plan.prefill = plan_prefill(slots, &waiting, prefill_budget);
    plan
}

/// How many prompt tokens each of `waiting` (slot indexes, oldest first)
/// reads of `budget`. The shortest unread prompts go first, so a short
/// request that arrives while a long prompt is read starts at the next
/// step instead of after it; the oldest prompt keeps a quarter of the
/// budget, so a run of short ones cannot starve it.
fn plan_prefill(slots: &[SlotView], waiting: &[usize], budget: usize) -> Vec<(usize, usize)> {
    let mut prefill = Vec::new();
    let Some(&oldest) = waiting.first() else {
        return prefill;
    };
    let kept = slots[oldest].unread_prompt.min(budget.div_ceil(4));
    let mut budget = budget - kept;
    let mut shortest: Vec<usize> = waiting[1..].to_vec();
    shortest.sort_by_key(|&i| (slots[i].unread_prompt, i));
    for i in shortest {
        if budget == 0 {
            break;
        }
        let n = slots[i].unread_prompt.min(budget);
        budget -= n;
        prefill.push((i, n));
    }
    // The oldest: its quarter and whatever the others left.
    let n = slots[oldest].unread_prompt.min(kept + budget);
    if n > 0 {
        prefill.push((oldest, n));
    }
    prefill.sort_unstable();
    prefill
}

/// How many prompt tokens a step may read so that the sequences decoding
/// in it get their token within a time budget (the idea of Sarathi-Serve's
/// stall-free batching: decode first, then as much prefill as fits). The
/// cost of a prompt token grows with the context already filled, so it is
/// measured online, step by step, rather than fixed: after each step the
/// pacer learns what a decode-only step costs and what each prompt token
/// added, and sizes the next step's prefill to the room left. With nobody
/// decoding, nobody waits: the whole chunk.
#[derive(Debug, Clone)]
pub struct PrefillPacer {
    /// The step time to stay within while sequences decode, in seconds.
    target_s: f64,
    /// The most prompt tokens a step holds (the batch's size for them).
    max_tokens: usize,
    /// Seconds of a step with decoders and no prefill (a moving average).
    decode_s: Option<f64>,
    /// Seconds each prompt token added to a step, lately.
    per_token_s: Option<f64>,
}

/// The fewest prompt tokens a step reads while any are waiting, so a
/// prompt always advances.
const MIN_PREFILL: usize = 8;
/// Weight of the newest observation in the moving averages: the cost of a
/// prompt token rises as its context fills, so the estimate follows fast.
const NEWEST: f64 = 0.5;

impl PrefillPacer {
    pub fn new(target_s: f64, max_tokens: usize) -> Self {
        PrefillPacer {
            target_s,
            max_tokens: max_tokens.max(1),
            decode_s: None,
            per_token_s: None,
        }
    }

    /// The prompt tokens the next step may read beside `decoders`
    /// decoding sequences.
    pub fn budget(&self, decoders: usize) -> usize {
        if decoders == 0 {
            return self.max_tokens;
        }
        let floor = MIN_PREFILL.min(self.max_tokens);
        let Some(per_token) = self.per_token_s else {
            // Nothing measured yet: a small step, to learn from.
            return floor.max(self.max_tokens / 8).min(self.max_tokens);
        };
        let room = self.target_s - self.decode_s.unwrap_or(0.0);
        let fits = (room / per_token.max(1e-6)).floor();
        if fits.is_finite() && fits > 0.0 {
            (fits as usize).clamp(floor, self.max_tokens)
        } else {
            floor
        }
    }

    /// What a step of `decoders` decoding sequences and `prefilled` prompt
    /// tokens took.
    pub fn observe(&mut self, decoders: usize, prefilled: usize, took_s: f64) {
        if !took_s.is_finite() || took_s < 0.0 {
            return;
        }
        let blend = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + NEWEST * (new - o)));
        if prefilled == 0 {
            if decoders > 0 {
                self.decode_s = blend(self.decode_s, took_s);
            }
            return;
        }
        let base = if decoders > 0 {
            self.decode_s.unwrap_or(0.0)
        } else {
            0.0
        };
        let per_token = ((took_s - base) / prefilled as f64).max(0.0);
        self.per_token_s = blend(self.per_token_s, per_token);
    }
}

/// Whether a request needing `need` KV cells fits next to those reserved.
/// Each admitted sequence reserves prompt + max_tokens cells, so decoding can
/// never run out of cache mid-stream.
pub fn fits(reserved: usize, need: usize, capacity: usize) -> bool {
    reserved + need <= capacity
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slots(unread: &[usize]) -> Vec<SlotView> {
        unread
            .iter()
            .map(|&u| SlotView {
                unread_prompt: u,
                batch: false,
            })
            .collect()
    }

    /// Slots from (unread prompt, batch?) pairs.
    fn classed(views: &[(usize, bool)]) -> Vec<SlotView> {
        views
            .iter()
            .map(|&(u, batch)| SlotView {
                unread_prompt: u,
                batch,
            })
            .collect()
    }

    fn share(beside: usize, reserved_turn: bool, rotation: usize) -> BatchShare {
        BatchShare {
            beside,
            reserved_turn,
            rotation,
        }
    }

    #[test]
    fn decoders_always_step_and_a_long_prompt_is_chunked() {
        let plan = plan_step(&slots(&[0, 1000, 0]), 256, BatchShare::default());
        assert_eq!(plan.decode, vec![0, 2]);
        assert_eq!(plan.prefill, vec![(1, 256)]);
    }

    #[test]
    fn short_prompts_go_first_and_the_oldest_keeps_a_quarter() {
        // The oldest (100) keeps 64 of 256; the others, shortest first,
        // take the rest (50, then 142 of 300); the oldest nothing more.
        let plan = plan_step(&slots(&[100, 300, 50]), 256, BatchShare::default());
        assert_eq!(plan.prefill, vec![(0, 64), (1, 142), (2, 50)]);
        assert!(plan.decode.is_empty());
        // A short request arriving while a long prompt is read starts now.
        let plan = plan_step(&slots(&[0, 6000, 0, 12]), 256, BatchShare::default());
        assert_eq!(plan.decode, vec![0, 2]);
        assert_eq!(plan.prefill, vec![(1, 244), (3, 12)]);
        // Short ones without end still leave the oldest its quarter.
        let plan = plan_step(&slots(&[6000, 300, 300, 300]), 256, BatchShare::default());
        assert_eq!(plan.prefill, vec![(0, 64), (1, 192)]);
        // One prompt alone takes the whole budget.
        assert_eq!(
            plan_step(&slots(&[6000]), 256, BatchShare::default()).prefill,
            vec![(0, 256)]
        );
    }

    #[test]
    fn batch_work_waits_while_an_interactive_prompt_is_read() {
        // Batch decoders (0, 2) and a batch prompt (3) beside an
        // interactive prompt (1): the step is the interactive prompt's.
        let s = classed(&[(0, true), (40, false), (0, true), (30, true)]);
        let plan = plan_step(&s, 256, share(4, false, 0));
        assert!(plan.decode.is_empty());
        assert_eq!(plan.prefill, vec![(1, 40)]);
        // On the batch's reserved turn every sequence steps.
        let plan = plan_step(&s, 256, share(4, true, 0));
        assert_eq!(plan.decode, vec![0, 2]);
        assert_eq!(plan.prefill, vec![(1, 40), (3, 30)]);
    }

    #[test]
    fn batch_decoders_take_turns_beside_interactive_decoders() {
        // One interactive decoder (2), four batch decoders, a batch prompt.
        let s = classed(&[
            (0, true),
            (0, true),
            (0, false),
            (0, true),
            (0, true),
            (9, true),
        ]);
        let picked = |rotation| plan_step(&s, 256, share(2, false, rotation));
        assert_eq!(picked(0).decode, vec![0, 1, 2]);
        assert!(picked(0).prefill.is_empty());
        assert_eq!(picked(1).decode, vec![1, 2, 3]);
        assert_eq!(picked(3).decode, vec![0, 2, 4]);
        // Every batch decoder gets its place over as many steps as there
        // are of them.
        let mut seen = std::collections::BTreeSet::new();
        for rotation in 0..4 {
            seen.extend(picked(rotation).decode);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        // None beside: the interactive decoder alone.
        assert_eq!(plan_step(&s, 256, share(0, false, 0)).decode, vec![2]);
    }

    #[test]
    fn a_batch_alone_steps_like_any_work() {
        let s = classed(&[(0, true), (300, true), (0, true)]);
        let plan = plan_step(&s, 256, share(0, false, 5));
        assert_eq!(plan.decode, vec![0, 2]);
        assert_eq!(plan.prefill, vec![(1, 256)]);
    }

    #[test]
    fn admission_respects_capacity() {
        assert!(fits(0, 8192, 8192));
        assert!(!fits(100, 8100, 8192));
    }

    /// A step's cost as llama.cpp's on this machine grows: a fixed part
    /// per step, and per prompt token more the fuller its context.
    fn step_cost(decoders: usize, prefill: usize, context: usize) -> f64 {
        let per_token = 0.0015 + 0.0000006 * context as f64;
        0.018 + 0.0005 * decoders as f64 + per_token * prefill as f64
    }

    #[test]
    fn the_pacer_keeps_steps_within_budget_as_a_long_prompt_fills_its_context() {
        let mut pacer = PrefillPacer::new(0.12, 256);
        // Four streams decoding alone teach it the decode step.
        for _ in 0..5 {
            pacer.observe(4, 0, step_cost(4, 0, 0));
        }
        let (mut read, prompt, mut steps, mut worst) = (0, 6391, 0, 0.0f64);
        while read < prompt {
            let n = pacer.budget(4).min(prompt - read);
            let took = step_cost(4, n, read);
            if steps > 1 {
                worst = worst.max(took);
            }
            pacer.observe(4, n, took);
            read += n;
            steps += 1;
        }
        // Every step after the first two within a tenth of the target.
        assert!(worst <= 0.132, "worst step {worst}");
        // And the prompt still read in far fewer steps than one token each.
        assert!(steps < prompt / 20, "{steps} steps");
        // With nobody decoding, the whole chunk.
        assert_eq!(pacer.budget(0), 256);
    }

    #[test]
    fn the_pacer_always_lets_a_prompt_advance() {
        let mut pacer = PrefillPacer::new(0.01, 256);
        pacer.observe(4, 0, 0.05); // decoding alone already over budget
        pacer.observe(4, 64, 1.0);
        assert_eq!(pacer.budget(4), MIN_PREFILL);
        // Nonsense timings change nothing.
        let before = pacer.budget(4);
        pacer.observe(4, 10, f64::NAN);
        pacer.observe(4, 10, -1.0);
        assert_eq!(pacer.budget(4), before);
    }

    proptest! {
        #[test]
        fn the_pacer_stays_within_the_chunk_and_above_the_floor(
            target in 0.001f64..2.0,
            max in 1usize..1024,
            steps in proptest::collection::vec((0usize..8, 0usize..1024, 0.0f64..3.0), 0..40),
        ) {
            let mut pacer = PrefillPacer::new(target, max);
            for (decoders, prefilled, took) in steps {
                pacer.observe(decoders, prefilled, took);
                for d in [0, decoders] {
                    let b = pacer.budget(d);
                    prop_assert!(b >= 1 && b <= max);
                    prop_assert!(b >= MIN_PREFILL.min(max));
                }
            }
        }


        #[test]
        fn batch_work_never_takes_what_interactive_work_needs(
            views in proptest::collection::vec((0usize..600, any::<bool>()), 0..16),
            budget in 1usize..1024,
            beside in 0usize..8,
            rotation in 0usize..64,
            reserved_turn in any::<bool>(),
        ) {
            let s = classed(&views);
            let plan = plan_step(&s, budget, share(beside, reserved_turn, rotation));
            let interactive = views.iter().any(|v| !v.1);
            let unread: Vec<usize> = views.iter().map(|v| v.0).collect();
            let blind = plan_step(&slots(&unread), budget, BatchShare::default());
            if !interactive || reserved_turn {
                // Nothing to yield to: the class changes nothing.
                prop_assert_eq!(&plan, &blind);
            } else {
                // Every interactive decoder decodes; interactive prompts read
                // as much of the budget as they have.
                for (i, v) in views.iter().enumerate() {
                    if !v.1 && v.0 == 0 {
                        prop_assert!(plan.decode.contains(&i));
                    }
                }
                let interactive_unread: usize = views.iter().filter(|v| !v.1).map(|v| v.0).sum();
                let prefilled: usize = plan.prefill.iter().map(|p| p.1).sum();
                prop_assert_eq!(prefilled, interactive_unread.min(budget));
                // No batch prompt; batch decoders only beside decoding
                // interactive work, and at most `beside` of them.
                let batch_decoding = plan.decode.iter().filter(|&&i| views[i].1).count();
                prop_assert!(plan.prefill.iter().all(|p| !views[p.0].1));
                prop_assert!(batch_decoding <= beside);
                if interactive_unread > 0 {
                    prop_assert_eq!(batch_decoding, 0);
                } else {
                    let batch_decoders = views.iter().filter(|v| v.1 && v.0 == 0).count();
                    prop_assert_eq!(batch_decoding, batch_decoders.min(beside));
                }
            }
            prop_assert!(plan.tokens() <= blind.tokens());
        }

        #[test]
        fn plan_never_exceeds_budget_and_never_skips_a_decoder(
            unread in proptest::collection::vec(0usize..2000, 0..16),
            budget in 1usize..1024,
        ) {
            let s = slots(&unread);
            let plan = plan_step(&s, budget, BatchShare::default());
            let prefilled: usize = plan.prefill.iter().map(|p| p.1).sum();
            prop_assert!(prefilled <= budget);
            let decoders = unread.iter().filter(|&&u| u == 0).count();
            prop_assert_eq!(plan.decode.len(), decoders);
            for &(i, n) in &plan.prefill {
                prop_assert!(n >= 1 && n <= unread[i]);
            }
            // The oldest prompt always makes progress, by at least a
            // quarter of the budget (or what it has left).
            if let Some(oldest) = unread.iter().position(|&u| u > 0) {
                let got = plan.prefill.iter().find(|p| p.0 == oldest).map_or(0, |p| p.1);
                prop_assert!(got >= unread[oldest].min(budget.div_ceil(4)));
            }
            // The whole budget is used while prompts are left unread.
            let unread_total: usize = unread.iter().sum();
            prop_assert_eq!(prefilled, unread_total.min(budget));
        }
    }
}
