//! The catalog a gateway serves: models, each with a pool, and aliases
//! that stand for them by weight (a stable name over versions, a canary's
//! split). Which model a request for an alias goes to is decided here,
//! purely, from what the request carries:
//!
//! - a conversation stays on the model its last turn used while the alias
//!   still names that model, whatever its weight (0 takes no new
//!   conversations but keeps its own), so its turns keep one version and
//!   that version's KV cache;
//! - otherwise the pick is weighted rendezvous hashing of a key the whole
//!   conversation shares (its id, or a chat's opening turns salted with
//!   the tenant): every gateway picks alike without sharing state, and
//!   when a weight changes only the conversations that must move do, to
//!   or from the model whose weight changed.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use strata_core::openai::PromptInput;

use crate::fleet::prefix_index::BLOCK_CHARS;

/// A model id of the catalog this gateway serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogModel {
    /// The id clients send.
    pub id: String,
    /// What a chat without `max_tokens` may generate at most on its
    /// engines (`engine.default_max_tokens` as the model sets it).
    pub default_max_tokens: u32,
    /// An alias's models by weight; empty for a model with a pool.
    pub alias: BTreeMap<String, u32>,
    /// The one tenant (by name) that may use the model; for the others it
    /// does not exist. `None`: every tenant.
    pub tenant: Option<String>,
}

impl CatalogModel {
    /// A model served by a pool of its own.
    pub fn model(id: impl Into<String>, default_max_tokens: u32) -> CatalogModel {
        CatalogModel {
            id: id.into(),
            default_max_tokens,
            alias: BTreeMap::new(),
            tenant: None,
        }
    }

    /// The model kept to one tenant (by name), or to none.
    pub fn for_tenant(mut self, tenant: Option<String>) -> CatalogModel {
        self.tenant = tenant;
        self
    }

    /// Whether the tenant named `tenant` may see and use it.
    pub fn visible_to(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }

    /// An alias for `alias`'s models, by weight.
    pub fn alias(id: impl Into<String>, alias: BTreeMap<String, u32>) -> CatalogModel {
        CatalogModel {
            id: id.into(),
            default_max_tokens: 0,
            alias,
            tenant: None,
        }
    }

    pub fn is_alias(&self) -> bool {
        !self.alias.is_empty()
    }
}

/// The model a request for the alias `alias` goes to, among its models
/// that `served` says have a pool: `previous` (the model the
/// conversation's last turn used) while the alias names it, else the
/// weighted rendezvous pick for `key`. `None`: no model of the alias can
/// take it.
pub fn pick<'a>(
    alias: &'a BTreeMap<String, u32>,
    served: impl Fn(&str) -> bool,
    previous: Option<&str>,
    key: &[u8],
) -> Option<&'a str> {
    if let Some((kept, _)) = previous.and_then(|p| alias.get_key_value(p)) {
        if served(kept) {
            return Some(kept);
        }
    }
    alias
        .iter()
        .filter(|(model, weight)| **weight > 0 && served(model))
        .map(|(model, weight)| (score(key, model, *weight), model.as_str()))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, model)| model)
}

/// Weighted rendezvous: each model draws an exponential variable of rate
/// `weight` from the hash of (key, model); the smallest draw wins, so a
/// model wins a share of keys in proportion to its weight, and changing
/// one model's weight moves keys only to or from that model.
fn score(key: &[u8], model: &str, weight: u32) -> f64 {
    let mut h = Sha256::new();
    h.update((key.len() as u64).to_le_bytes());
    h.update(key);
    h.update(model.as_bytes());
    let digest = h.finalize();
    let bits = u64::from_le_bytes(digest[..8].try_into().expect("eight bytes")) >> 11;
    // Uniform in (0, 1), never 0 or 1.
    let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
    -u.ln() / f64::from(weight)
}

/// The key that keeps a stateless chat on one model of an alias: its
/// opening turns (up to and including the first user turn), which every
/// later request of the same conversation repeats, salted with the tenant;
/// for a prompt, its first block.
pub fn conversation_key(tenant: &str, input: &PromptInput) -> Vec<u8> {
    let mut key = tenant.as_bytes().to_vec();
    key.push(0);
    match input {
        PromptInput::Text(t) => {
            let end = t
                .char_indices()
                .nth(BLOCK_CHARS)
                .map_or(t.len(), |(i, _)| i);
            key.extend_from_slice(&t.as_bytes()[..end]);
        }
        PromptInput::Chat(turns) | PromptInput::Continue(turns) => {
            for t in turns {
                key.extend_from_slice(t.role.as_str().as_bytes());
                key.push(b':');
                key.extend_from_slice(t.text.as_bytes());
                key.push(0);
                if t.role == strata_core::openai::Role::User {
                    break;
                }
            }
        }
    }
    key
}

/// The key of a stored session (a conversation's id, a response's id),
/// salted with the tenant.
pub fn session_key(tenant: &str, session: &str) -> Vec<u8> {
    let mut key = tenant.as_bytes().to_vec();
    key.push(1);
    key.extend_from_slice(session.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alias(weights: &[(&str, u32)]) -> BTreeMap<String, u32> {
        weights.iter().map(|(m, w)| (m.to_string(), *w)).collect()
    }

    fn share(a: &BTreeMap<String, u32>, model: &str, keys: u32) -> f64 {
        let won = (0..keys)
            .filter(|k| pick(a, |_| true, None, &k.to_le_bytes()) == Some(model))
            .count();
        won as f64 / f64::from(keys)
    }

    #[test]
    fn models_win_keys_in_proportion_to_their_weights() {
        let canary = alias(&[("v1", 90), ("v2", 10)]);
        let s = share(&canary, "v2", 20_000);
        assert!((0.09..0.11).contains(&s), "v2 took {s}");
        let three = alias(&[("a", 1), ("b", 1), ("c", 2)]);
        let c = share(&three, "c", 20_000);
        assert!((0.48..0.52).contains(&c), "c took {c}");
    }

    #[test]
    fn a_conversation_stays_on_its_model_while_the_alias_names_it() {
        let a = alias(&[("v1", 0), ("v2", 100)]);
        // Weight 0: no new conversation, but its own stay.
        assert_eq!(pick(&a, |_| true, Some("v1"), b"k"), Some("v1"));
        assert_eq!(pick(&a, |_| true, None, b"k"), Some("v2"));
        // A model the alias no longer names, or one without a pool now:
        // the conversation moves.
        assert_eq!(pick(&a, |_| true, Some("v0"), b"k"), Some("v2"));
        assert_eq!(pick(&a, |m| m != "v1", Some("v1"), b"k"), Some("v2"));
        // Nothing with a weight and a pool: nothing takes it.
        assert_eq!(pick(&a, |m| m != "v2", None, b"k"), None);
    }

    #[test]
    fn a_chats_key_is_its_opening_so_later_turns_share_it() {
        use strata_core::openai::{Role, Turn};
        let turn = |role, text: &str| Turn {
            role,
            text: text.into(),
        };
        let first = PromptInput::Chat(vec![
            turn(Role::System, "Be brief."),
            turn(Role::User, "Hi"),
        ]);
        let later = PromptInput::Chat(vec![
            turn(Role::System, "Be brief."),
            turn(Role::User, "Hi"),
            turn(Role::Assistant, "Hello."),
            turn(Role::User, "And then?"),
        ]);
        let other = PromptInput::Chat(vec![turn(Role::User, "Hi")]);
        assert_eq!(conversation_key("t", &first), conversation_key("t", &later));
        assert_ne!(conversation_key("t", &first), conversation_key("t", &other));
        assert_ne!(conversation_key("t", &first), conversation_key("u", &first));
    }

    proptest! {
        /// Raising one model's weight moves keys only to it, never away
        /// from it or between the others: the conversations that move are
        /// the fewest the new split needs.
        #[test]
        fn raising_a_weight_moves_keys_only_to_that_model(
            weights in proptest::collection::vec(1u32..100, 2..5),
            which in 0usize..4,
            more in 1u32..200,
            key in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let names: Vec<String> = (0..weights.len()).map(|i| format!("m{i}")).collect();
            let before: BTreeMap<String, u32> = names.iter().cloned().zip(weights.iter().copied()).collect();
            let raised = &names[which % names.len()];
            let mut after = before.clone();
            *after.get_mut(raised).unwrap() += more;
            let was = pick(&before, |_| true, None, &key).unwrap();
            let now = pick(&after, |_| true, None, &key).unwrap();
            prop_assert!(was == now || now == raised.as_str(), "{was} -> {now}, raised {raised}");
        }

        /// A pick is always a model the alias names with a weight, and the
        /// same for the same key.
        #[test]
        fn a_pick_is_a_weighted_model_and_deterministic(
            weights in proptest::collection::vec(0u32..5, 1..5),
            key in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let a: BTreeMap<String, u32> = weights.iter().enumerate().map(|(i, w)| (format!("m{i}"), *w)).collect();
            let got = pick(&a, |_| true, None, &key);
            match got {
                None => prop_assert!(weights.iter().all(|w| *w == 0)),
                Some(m) => prop_assert!(a[m] > 0),
            }
            prop_assert_eq!(got, pick(&a, |_| true, None, &key));
        }
    }
}
