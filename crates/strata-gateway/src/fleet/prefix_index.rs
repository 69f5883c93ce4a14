//! Prefix-aware routing, kept pure: the gateway remembers which prompt
//! prefixes it sent to which replica, as chained hashes of fixed-size text
//! blocks salted with the tenant (whose cache is the only one a prompt can
//! reuse), and sends a new prompt where its longest prefix went before —
//! where the engine's prefix cache most likely still holds it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use strata_core::openai::PromptInput;

/// Characters per block: about 64 tokens of English.
pub const BLOCK_CHARS: usize = 256;
/// Blocks hashed per prompt (the first 16k characters).
pub const MAX_BLOCKS: usize = 64;
/// Blocks remembered per replica before the oldest are forgotten.
pub const BLOCKS_PER_REPLICA: usize = 65_536;

/// The text a prompt's blocks are cut from: each chat turn as `role:text`.
pub fn prompt_text(input: &PromptInput) -> String {
    match input {
        PromptInput::Text(t) => t.clone(),
        PromptInput::Chat(turns) | PromptInput::Continue(turns) => turns
            .iter()
            .map(|t| format!("{}:{}\n", t.role.as_str(), t.text))
            .collect(),
    }
}

/// Chained hashes of `text`'s whole blocks: block `i`'s hash covers the
/// tenant and every block up to `i`, so equal hashes mean equal prefixes.
pub fn block_hashes(tenant: &str, text: &str) -> Vec<u64> {
    let mut h = DefaultHasher::new();
    tenant.hash(&mut h);
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().take(BLOCK_CHARS * MAX_BLOCKS).collect();
    for block in chars.chunks_exact(BLOCK_CHARS) {
        block.hash(&mut h);
        out.push(h.finish());
    }
    out
}

#[derive(Debug, Default)]
struct Blocks {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
}

/// Which block hashes each replica (by endpoint id) was sent lately.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    replicas: HashMap<String, Blocks>,
}

impl PrefixIndex {
    /// How many leading blocks of `hashes` each of `replicas` has seen.
    pub fn matches(&self, replicas: &[&str], hashes: &[u64]) -> Vec<usize> {
        replicas
            .iter()
            .map(|id| {
                self.replicas.get(*id).map_or(0, |b| {
                    hashes.iter().take_while(|h| b.seen.contains(h)).count()
                })
            })
            .collect()
    }

    /// Remembers that `replica` was sent a prompt with these blocks.
    pub fn record(&mut self, replica: &str, hashes: &[u64]) {
        let b = self.replicas.entry(replica.to_owned()).or_default();
        for &h in hashes {
            if b.seen.insert(h) {
                b.order.push_back(h);
            }
        }
        while b.order.len() > BLOCKS_PER_REPLICA {
            if let Some(old) = b.order.pop_front() {
                b.seen.remove(&old);
            }
        }
    }

    /// Forgets replicas that are gone.
    pub fn retain(&mut self, live: &[&str]) {
        self.replicas.retain(|id, _| live.contains(&id.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(blocks: &[char]) -> String {
        blocks
            .iter()
            .map(|c| c.to_string().repeat(BLOCK_CHARS))
            .collect()
    }

    #[test]
    fn a_shared_prefix_matches_where_it_went_and_only_for_its_tenant() {
        let mut index = PrefixIndex::default();
        index.record("r0", &block_hashes("ten_a", &text(&['s', 'x', 'y'])));
        index.record("r1", &block_hashes("ten_a", &text(&['t'])));
        let next = block_hashes("ten_a", &text(&['s', 'x', 'z', 'w']));
        assert_eq!(index.matches(&["r0", "r1", "r9"], &next), vec![2, 0, 0]);
        let other = block_hashes("ten_b", &text(&['s', 'x', 'z']));
        assert_eq!(index.matches(&["r0", "r1"], &other), vec![0, 0]);
    }

    #[test]
    fn a_different_first_block_matches_nothing_later() {
        let mut index = PrefixIndex::default();
        index.record("r0", &block_hashes("t", &text(&['a', 'b'])));
        assert_eq!(
            index.matches(&["r0"], &block_hashes("t", &text(&['c', 'b']))),
            vec![0]
        );
    }

    #[test]
    fn short_prompts_have_no_blocks_and_memory_is_bounded() {
        assert!(block_hashes("t", "short").is_empty());
        let mut index = PrefixIndex::default();
        for i in 0..(BLOCKS_PER_REPLICA as u64 + 10) {
            index.record("r0", &[i]);
        }
        assert_eq!(index.matches(&["r0"], &[0]), vec![0]);
        assert_eq!(
            index.matches(&["r0"], &[BLOCKS_PER_REPLICA as u64 + 9]),
            vec![1]
        );
        index.retain(&[]);
        assert_eq!(
            index.matches(&["r0"], &[BLOCKS_PER_REPLICA as u64 + 9]),
            vec![0]
        );
    }
}
