//! Which replica serves a request: the pure routing policy.

/// What the router knows about one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaLoad {
    pub ready: bool,
    /// Estimated tokens (prompt + max output) of requests in flight there.
    pub outstanding_tokens: u64,
}

/// The ready replica with the fewest outstanding tokens, skipping `tried`.
/// Ties go to the first at or after `rotation`, so equal replicas share load.
pub fn pick(replicas: &[ReplicaLoad], tried: &[usize], rotation: usize) -> Option<usize> {
    let n = replicas.len();
    (0..n)
        .map(|k| (rotation + k) % n)
        .filter(|i| replicas[*i].ready && !tried.contains(i))
        .min_by_key(|&i| replicas[i].outstanding_tokens)
}

/// How many more outstanding tokens than the least loaded replica a session's
/// own replica may carry and still get the session's next turn: about one
/// full context of the default engine, so affinity never piles up work.
pub const AFFINITY_SLACK_TOKENS: u64 = 8192;

/// Among replicas that are ready, untried and within
/// `AFFINITY_SLACK_TOKENS` of the least loaded: `preferred` (the replica
/// holding the session's KV cache), else the one whose cache most likely
/// holds the longest prefix of the prompt (`matches[i]`: leading prompt
/// blocks replica `i` was sent; ties to the less loaded); otherwise what
/// `pick` chooses.
pub fn pick_with_affinity(
    replicas: &[ReplicaLoad],
    tried: &[usize],
    rotation: usize,
    preferred: Option<usize>,
    matches: &[usize],
) -> Option<usize> {
    let best = pick(replicas, tried, rotation)?;
    let fit = |i: usize| {
        i < replicas.len()
            && replicas[i].ready
            && !tried.contains(&i)
            && replicas[i].outstanding_tokens
                <= replicas[best].outstanding_tokens + AFFINITY_SLACK_TOKENS
    };
    if let Some(p) = preferred.filter(|&p| fit(p)) {
        return Some(p);
    }
    let by_prefix = (0..replicas.len())
        .filter(|&i| matches.get(i).is_some_and(|&m| m > 0) && fit(i))
        .max_by_key(|&i| {
            (
                matches[i],
                std::cmp::Reverse(replicas[i].outstanding_tokens),
            )
        });
    Some(by_prefix.unwrap_or(best))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(ready: bool, outstanding_tokens: u64) -> ReplicaLoad {
        ReplicaLoad {
            ready,
            outstanding_tokens,
        }
    }

    #[test]
    fn least_outstanding_ready_replica_wins() {
        assert_eq!(
            pick(&[r(true, 50), r(true, 10), r(false, 0)], &[], 0),
            Some(1)
        );
    }

    #[test]
    fn a_tried_replica_is_not_picked_again() {
        assert_eq!(pick(&[r(true, 50), r(true, 10)], &[1], 0), Some(0));
        assert_eq!(pick(&[r(true, 50), r(true, 10)], &[0, 1], 0), None);
    }

    #[test]
    fn ties_rotate() {
        let all = [r(true, 0), r(true, 0), r(true, 0)];
        assert_eq!(pick(&all, &[], 0), Some(0));
        assert_eq!(pick(&all, &[], 1), Some(1));
        assert_eq!(pick(&all, &[], 5), Some(2));
    }

    #[test]
    fn nothing_ready_is_none() {
        assert_eq!(pick(&[r(false, 0)], &[], 0), None);
        assert_eq!(pick(&[], &[], 3), None);
    }

    #[test]
    fn a_session_stays_on_its_replica_until_it_is_too_busy_or_gone() {
        let slack = AFFINITY_SLACK_TOKENS;
        let loads = [r(true, 0), r(true, slack)];
        assert_eq!(pick_with_affinity(&loads, &[], 0, Some(1), &[]), Some(1));
        let busy = [r(true, 0), r(true, slack + 1)];
        assert_eq!(pick_with_affinity(&busy, &[], 0, Some(1), &[]), Some(0));
        let down = [r(true, 100), r(false, 0)];
        assert_eq!(pick_with_affinity(&down, &[], 0, Some(1), &[]), Some(0));
        assert_eq!(pick_with_affinity(&loads, &[1], 0, Some(1), &[]), Some(0));
        assert_eq!(pick_with_affinity(&loads, &[], 0, Some(9), &[]), Some(0));
    }

    #[test]
    fn without_a_session_the_longest_prefix_wins_within_bounds() {
        let loads = [r(true, 0), r(true, 500), r(true, 100)];
        assert_eq!(
            pick_with_affinity(&loads, &[], 0, None, &[0, 3, 3]),
            Some(2)
        );
        assert_eq!(
            pick_with_affinity(&loads, &[], 0, None, &[0, 4, 3]),
            Some(1)
        );
        assert_eq!(pick_with_affinity(&loads, &[], 0, None, &[]), Some(0));
        let busy = [r(true, 0), r(true, AFFINITY_SLACK_TOKENS + 1)];
        assert_eq!(pick_with_affinity(&busy, &[], 0, None, &[0, 9]), Some(0));
        // A session's own replica comes before a longer prefix elsewhere.
        assert_eq!(
            pick_with_affinity(&loads, &[], 0, Some(0), &[0, 9, 9]),
            Some(0)
        );
    }

    proptest! {
        #[test]
        fn affinity_is_bounded_and_never_picks_an_unready_or_tried_replica(
            loads in proptest::collection::vec((any::<bool>(), 0u64..20_000), 0..12),
            tried in proptest::collection::vec(0usize..12, 0..4),
            preferred in proptest::option::of(0usize..14),
            matches in proptest::collection::vec(0usize..4, 0..12),
        ) {
            let replicas: Vec<_> = loads.iter().map(|&(a, b)| r(a, b)).collect();
            let eligible: Vec<usize> = (0..replicas.len()).filter(|i| replicas[*i].ready && !tried.contains(i)).collect();
            match pick_with_affinity(&replicas, &tried, 0, preferred, &matches) {
                None => prop_assert!(eligible.is_empty()),
                Some(i) => {
                    prop_assert!(eligible.contains(&i));
                    let min = eligible.iter().map(|&j| replicas[j].outstanding_tokens).min().unwrap();
                    prop_assert!(replicas[i].outstanding_tokens <= min + AFFINITY_SLACK_TOKENS);
                    if Some(i) != preferred && matches.get(i).copied().unwrap_or(0) == 0 {
                        prop_assert_eq!(replicas[i].outstanding_tokens, min);
                    }
                }
            }
        }

        #[test]
        fn never_picks_an_unready_or_tried_replica_and_picks_a_minimum(
            loads in proptest::collection::vec((any::<bool>(), 0u64..1000), 0..12),
            tried in proptest::collection::vec(0usize..12, 0..4),
            rotation in 0usize..100,
        ) {
            let replicas: Vec<_> = loads.iter().map(|&(a, b)| r(a, b)).collect();
            let eligible: Vec<usize> = (0..replicas.len()).filter(|i| replicas[*i].ready && !tried.contains(i)).collect();
            match pick(&replicas, &tried, rotation) {
                None => prop_assert!(eligible.is_empty()),
                Some(i) => {
                    prop_assert!(eligible.contains(&i));
                    let min = eligible.iter().map(|&j| replicas[j].outstanding_tokens).min().unwrap();
                    prop_assert_eq!(replicas[i].outstanding_tokens, min);
                }
            }
        }
    }
}
