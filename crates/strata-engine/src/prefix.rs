//! Prefix reuse, kept pure: a finished sequence keeps its KV cells under the
//! scope (tenant salt) it ran for, so a later request in the same scope that
//! starts with the same tokens prefills only the rest. A request never
//! matches an entry of another scope, so one tenant's prompt cannot make
//! another's faster (the timing side channel of shared prefix caches).
//!
//! The scheduler owns the llama.cpp side: every entry holds one sequence id
//! whose cells are the entry's tokens at positions 0.., and the ids this
//! cache hands back from `insert` and `evict_lru` must be cleared.

/// Shorter matches are not worth a sequence copy (every chat prompt shares
/// its first few template tokens).
pub const MIN_REUSE: usize = 16;

#[derive(Debug)]
struct Entry<T> {
    seq: i32,
    scope: String,
    /// The conversation or response chain the cells continue, if named.
    session: Option<String>,
    tokens: Vec<T>,
    used: u64,
}

/// A kept sequence that belongs to a named session (for snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry<T> {
    pub seq: i32,
    pub scope: String,
    pub session: String,
    pub tokens: Vec<T>,
}

/// The best entry for a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub seq: i32,
    /// Prompt tokens whose cells can be reused; always leaves at least one
    /// prompt token to prefill, whose logits start the generation.
    pub common: usize,
    /// The match covers (almost) the whole entry, so the request takes the
    /// entry's sequence over instead of copying from it.
    pub whole: bool,
    /// Tokens the entry holds.
    pub len: usize,
}

#[derive(Debug)]
pub struct PrefixCache<T> {
    entries: Vec<Entry<T>>,
    max_entries: usize,
    clock: u64,
    cells: usize,
}

impl<T: Copy + Eq> PrefixCache<T> {
    /// A cache of at most `max_entries` sequences; 0 keeps nothing.
    pub fn new(max_entries: usize) -> Self {
        PrefixCache {
            entries: Vec::new(),
            max_entries,
            clock: 0,
            cells: 0,
        }
    }

    /// KV cells the entries hold (shared cells counted once per entry, so
    /// this never undercounts).
    pub fn cells(&self) -> usize {
        self.cells
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `scope` sharing the longest prefix with `prompt`.
    pub fn lookup(&self, scope: &str, prompt: &[T]) -> Option<Hit> {
        let usable = prompt.len().saturating_sub(1);
        self.entries
            .iter()
            .filter(|e| e.scope == scope)
            .map(|e| {
                let common = common_prefix(&e.tokens, prompt).min(usable);
                (e, common)
            })
            .filter(|&(_, common)| common >= MIN_REUSE)
            // Longest match; among equals the most recently used.
            .max_by_key(|&(e, common)| (common, e.used))
            .map(|(e, common)| Hit {
                seq: e.seq,
                common,
                whole: common + 1 >= e.tokens.len(),
                len: e.tokens.len(),
            })
    }

    /// Removes the entry on `seq`; its cells now belong to the caller.
    pub fn take(&mut self, seq: i32) -> bool {
        match self.entries.iter().position(|e| e.seq == seq) {
            Some(i) => {
                let e = self.entries.swap_remove(i);
                self.cells -= e.tokens.len();
                true
            }
            None => false,
        }
    }

    /// Marks the entry on `seq` as just used.
    pub fn touch(&mut self, seq: i32) {
        self.clock += 1;
        let now = self.clock;
        if let Some(e) = self.entries.iter_mut().find(|e| e.seq == seq) {
            e.used = now;
        }
    }

    /// Keeps `tokens` (the cells of sequence `seq`) for `scope` and
    /// `session`. Returns the sequence ids to clear: entries of the same
    /// scope that are a prefix of the new one (it answers every lookup they
    /// would) or an earlier turn of the same session, the least recently
    /// used beyond `max_entries`, or `seq` itself when nothing is kept.
    pub fn insert(
        &mut self,
        seq: i32,
        scope: &str,
        session: Option<&str>,
        tokens: Vec<T>,
    ) -> Vec<i32> {
        if self.max_entries == 0 || tokens.len() < MIN_REUSE {
            return vec![seq];
        }
        let mut freed = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            let e = &self.entries[i];
            let same_session = session.is_some() && e.session.as_deref() == session;
            if e.scope == scope && (same_session || tokens.starts_with(&e.tokens)) {
                self.cells -= e.tokens.len();
                freed.push(self.entries.swap_remove(i).seq);
            } else {
                i += 1;
            }
        }
        self.clock += 1;
        self.cells += tokens.len();
        self.entries.push(Entry {
            seq,
            scope: scope.to_string(),
            session: session.map(str::to_owned),
            tokens,
            used: self.clock,
        });
        while self.entries.len() > self.max_entries {
            freed.extend(self.evict_lru(None));
        }
        freed
    }

    /// The entries that belong to a named session.
    pub fn sessions(&self) -> Vec<SessionEntry<T>> {
        self.entries
            .iter()
            .filter_map(|e| {
                Some(SessionEntry {
                    seq: e.seq,
                    scope: e.scope.clone(),
                    session: e.session.clone()?,
                    tokens: e.tokens.clone(),
                })
            })
            .collect()
    }

    /// Drops every entry of `scope` (a deleted tenant's); their sequence
    /// ids, for clearing, and the cells they held.
    pub fn forget_scope(&mut self, scope: &str) -> (Vec<i32>, usize) {
        let mut freed = (Vec::new(), 0);
        self.entries.retain(|e| {
            if e.scope != scope {
                return true;
            }
            freed.0.push(e.seq);
            freed.1 += e.tokens.len();
            false
        });
        self.cells -= freed.1;
        freed
    }

    /// Drops the least recently used entry other than `keep`; its sequence
    /// id is returned for clearing.
    pub fn evict_lru(&mut self, keep: Option<i32>) -> Option<i32> {
        let (i, _) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| Some(e.seq) != keep)
            .min_by_key(|(_, e)| e.used)?;
        let e = self.entries.swap_remove(i);
        self.cells -= e.tokens.len();
        Some(e.seq)
    }
}

fn common_prefix<T: Eq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn toks(range: std::ops::Range<i32>) -> Vec<i32> {
        range.collect()
    }

    #[test]
    fn a_continuing_prompt_takes_its_entry_over() {
        let mut c = PrefixCache::new(4);
        assert!(c.insert(7, "ten_a", None, toks(0..100)).is_empty());
        let prompt = toks(0..130);
        let hit = c.lookup("ten_a", &prompt).unwrap();
        assert_eq!(
            hit,
            Hit {
                seq: 7,
                common: 100,
                whole: true,
                len: 100
            }
        );
        assert!(c.take(7));
        assert_eq!((c.len(), c.cells()), (0, 0));
    }

    #[test]
    fn another_scope_never_matches() {
        let mut c = PrefixCache::new(4);
        c.insert(1, "ten_a", None, toks(0..100));
        assert_eq!(c.lookup("ten_b", &toks(0..100)), None);
        assert_eq!(c.lookup("", &toks(0..100)), None);
    }

    #[test]
    fn a_shared_prefix_is_copied_and_the_entry_stays() {
        let mut c = PrefixCache::new(4);
        c.insert(1, "s", None, toks(0..100));
        let mut prompt = toks(0..40);
        prompt.extend(500..520);
        let hit = c.lookup("s", &prompt).unwrap();
        assert_eq!((hit.common, hit.whole), (40, false));
    }

    #[test]
    fn the_same_prompt_again_leaves_one_token_to_prefill() {
        let mut c = PrefixCache::new(4);
        c.insert(1, "s", None, toks(0..50));
        let hit = c.lookup("s", &toks(0..50)).unwrap();
        assert_eq!((hit.common, hit.whole), (49, true));
    }

    #[test]
    fn short_matches_and_short_entries_are_not_kept() {
        let mut c = PrefixCache::new(4);
        assert_eq!(c.insert(3, "s", None, toks(0..5)), vec![3]);
        c.insert(1, "s", None, toks(0..100));
        let mut prompt = toks(0..(MIN_REUSE as i32 - 1));
        prompt.push(-1);
        assert_eq!(c.lookup("s", &prompt), None);
    }

    #[test]
    fn a_longer_entry_replaces_the_prefix_it_extends() {
        let mut c = PrefixCache::new(4);
        c.insert(1, "s", None, toks(0..100));
        c.insert(2, "other", None, toks(0..100));
        assert_eq!(c.insert(3, "s", None, toks(0..150)), vec![1]);
        assert_eq!((c.len(), c.cells()), (2, 250));
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let mut c = PrefixCache::new(2);
        c.insert(1, "s", None, toks(0..20));
        c.insert(2, "s", None, toks(100..120));
        c.touch(1);
        assert_eq!(c.insert(3, "s", None, toks(200..220)), vec![2]);
        assert_eq!(c.evict_lru(Some(1)), Some(3));
        assert_eq!(c.evict_lru(Some(1)), None);
        assert_eq!(c.evict_lru(None), Some(1));
        assert!(c.is_empty());
    }

    #[test]
    fn a_session_keeps_only_its_latest_turn() {
        let mut c = PrefixCache::new(4);
        c.insert(1, "s", Some("conv_1"), toks(0..40));
        c.insert(2, "s", None, toks(100..140));
        // A retokenized answer diverges from the old entry; the old turn goes anyway.
        let mut next = toks(0..30);
        next.extend(500..540);
        assert_eq!(c.insert(3, "s", Some("conv_1"), next.clone()), vec![1]);
        let sessions = c.sessions();
        assert_eq!(sessions.len(), 1);
        assert_eq!((sessions[0].seq, sessions[0].tokens.clone()), (3, next));
        // Another tenant's entry with the same session name is its own.
        assert!(c.insert(4, "t", Some("conv_1"), toks(0..40)).is_empty());
        assert_eq!(c.sessions().len(), 2);
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let mut c = PrefixCache::new(0);
        assert_eq!(c.insert(9, "s", None, toks(0..100)), vec![9]);
        assert!(c.lookup("s", &toks(0..100)).is_none());
    }

    proptest! {
        #[test]
        fn cells_and_ids_stay_consistent(
            ops in proptest::collection::vec((0u8..3, 0usize..3, 0i32..4, 16usize..60), 1..60),
        ) {
            let scopes = ["a", "b", "c"];
            let mut c = PrefixCache::new(3);
            let mut held: Vec<i32> = Vec::new();
            let mut next = 0;
            for (op, scope, base, len) in ops {
                let tokens: Vec<i32> = (0..len as i32).map(|t| t * 7 + base).collect();
                match op {
                    0 => {
                        next += 1;
                        held.push(next);
                        for freed in c.insert(next, scopes[scope], None, tokens) {
                            prop_assert!(held.contains(&freed));
                            held.retain(|&s| s != freed);
                        }
                    }
                    1 => {
                        if let Some(hit) = c.lookup(scopes[scope], &tokens) {
                            prop_assert!(hit.common >= MIN_REUSE && hit.common < tokens.len());
                            if hit.whole {
                                prop_assert!(c.take(hit.seq));
                                held.retain(|&s| s != hit.seq);
                            } else {
                                c.touch(hit.seq);
                            }
                        }
                    }
                    _ => {
                        if let Some(freed) = c.evict_lru(None) {
                            held.retain(|&s| s != freed);
                        }
                    }
                }
                prop_assert!(c.len() <= 3);
                prop_assert_eq!(c.len(), held.len());
                let cells: usize = c.entries.iter().map(|e| e.tokens.len()).sum();
                prop_assert_eq!(c.cells(), cells);
                for e in &c.entries {
                    prop_assert!(held.contains(&e.seq));
                }
            }
        }
    }
}
