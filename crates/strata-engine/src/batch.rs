//! The batching policy, kept pure: which sequences decode, and how many prompt
//! tokens each prefilling sequence reads, in one step of the scheduler.

/// What the planner needs to know about one active sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// Prompt tokens not yet in the KV cache; 0 once the sequence decodes.
    pub unread_prompt: usize,
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

/// Every decoding sequence gets its token each step, so running streams never
/// stall; prompts share `prefill_budget` tokens in arrival order, so a long
/// prompt is read in chunks between decode steps.
pub fn plan_step(slots: &[SlotView], prefill_budget: usize) -> StepPlan {
    let mut plan = StepPlan::default();
    let mut budget = prefill_budget;
    for (i, s) in slots.iter().enumerate() {
        if s.unread_prompt == 0 {
            plan.decode.push(i);
        } else if budget > 0 {
            let n = s.unread_prompt.min(budget);
            budget -= n;
            plan.prefill.push((i, n));
        }
    }
    plan
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
            .map(|&u| SlotView { unread_prompt: u })
            .collect()
    }

    #[test]
    fn decoders_always_step_and_a_long_prompt_is_chunked() {
        let plan = plan_step(&slots(&[0, 1000, 0]), 256);
        assert_eq!(plan.decode, vec![0, 2]);
        assert_eq!(plan.prefill, vec![(1, 256)]);
    }

    #[test]
    fn prompts_share_the_budget_in_arrival_order() {
        let plan = plan_step(&slots(&[100, 300, 50]), 256);
        assert_eq!(plan.prefill, vec![(0, 100), (1, 156)]);
        assert!(plan.decode.is_empty());
    }

    #[test]
    fn admission_respects_capacity() {
        assert!(fits(0, 8192, 8192));
        assert!(!fits(100, 8100, 8192));
    }

    proptest! {
        #[test]
        fn plan_never_exceeds_budget_and_never_skips_a_decoder(
            unread in proptest::collection::vec(0usize..2000, 0..16),
            budget in 1usize..1024,
        ) {
            let s = slots(&unread);
            let plan = plan_step(&s, budget);
            let prefilled: usize = plan.prefill.iter().map(|p| p.1).sum();
            prop_assert!(prefilled <= budget);
            let decoders = unread.iter().filter(|&&u| u == 0).count();
            prop_assert_eq!(plan.decode.len(), decoders);
            for &(i, n) in &plan.prefill {
                prop_assert!(n >= 1 && n <= unread[i]);
            }
            // Someone with unread prompt always makes progress.
            if unread.iter().any(|&u| u > 0) { prop_assert!(!plan.prefill.is_empty()); }
        }
    }
}
