//! KV snapshots, kept pure: the byte format in which a session's KV cells
//! leave one replica and enter another. A snapshot names the engine it came
//! from (model and context settings, the `fingerprint`); one that does not
//! match the importing engine, or does not parse, is refused before any of
//! its bytes reach llama.cpp.
//!
//! Layout: `SKV1`, header length (u32 LE), header JSON, the tokens (i32 LE
//! each), then llama.cpp's per-sequence state. An export of many snapshots
//! frames each with its length (u64 LE): [`frame`] and [`frames`].

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"SKV1";

/// One session's cells as they travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The cache scope (tenant) the cells belong to.
    pub scope: String,
    /// The session (conversation or response chain) they continue.
    pub session: String,
    pub tokens: Vec<i32>,
    /// `llama_state_seq_get_data` of the sequence holding `tokens`.
    pub state: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    fingerprint: String,
    scope: String,
    session: String,
    tokens: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a KV snapshot, or a damaged one")]
    Malformed,
    #[error("the snapshot comes from another model or other context settings ({0})")]
    Mismatch(String),
}

impl Snapshot {
    pub fn encode(&self, fingerprint: &str) -> Vec<u8> {
        let header = serde_json::to_vec(&Header {
            fingerprint: fingerprint.to_owned(),
            scope: self.scope.clone(),
            session: self.session.clone(),
            tokens: self.tokens.len(),
        })
        .expect("a header serialises");
        let mut out =
            Vec::with_capacity(8 + header.len() + 4 * self.tokens.len() + self.state.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for t in &self.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out.extend_from_slice(&self.state);
        out
    }

    /// Scope and session from the header alone, without reading the cells
    /// (the gateway files a snapshot under them).
    pub fn ids(bytes: &[u8]) -> Result<(String, String), SnapshotError> {
        let (header, _) = header(bytes)?;
        Ok((header.scope, header.session))
    }

    /// Parses `bytes` and checks they come from an engine with `fingerprint`.
    pub fn decode(bytes: &[u8], fingerprint: &str) -> Result<Snapshot, SnapshotError> {
        let (header, rest) = header(bytes)?;
        if header.fingerprint != fingerprint {
            return Err(SnapshotError::Mismatch(header.fingerprint));
        }
        let (tokens, state) = split(
            rest,
            header
                .tokens
                .checked_mul(4)
                .ok_or(SnapshotError::Malformed)?,
        )?;
        if header.tokens == 0 || state.is_empty() {
            return Err(SnapshotError::Malformed);
        }
        Ok(Snapshot {
            scope: header.scope,
            session: header.session,
            tokens: tokens
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("four bytes")))
                .collect(),
            state: state.to_vec(),
        })
    }
}

fn header(bytes: &[u8]) -> Result<(Header, &[u8]), SnapshotError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(SnapshotError::Malformed)?;
    let (len, rest) = split(rest, 4)?;
    let len = u32::from_le_bytes(len.try_into().expect("four bytes")) as usize;
    let (header, rest) = split(rest, len)?;
    let header = serde_json::from_slice(header).map_err(|_| SnapshotError::Malformed)?;
    Ok((header, rest))
}

/// Appends one encoded snapshot to an export body.
pub fn frame(body: &mut Vec<u8>, snapshot: &[u8]) {
    body.extend_from_slice(&(snapshot.len() as u64).to_le_bytes());
    body.extend_from_slice(snapshot);
}

/// The encoded snapshots in an export body; a torn end is left out.
pub fn frames(mut body: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((len, rest)) = body.split_first_chunk::<8>() {
        let len = u64::from_le_bytes(*len);
        let Some(part) = usize::try_from(len).ok().and_then(|n| rest.get(..n)) else {
            break;
        };
        out.push(part);
        body = &rest[part.len()..];
    }
    out
}

fn split(bytes: &[u8], n: usize) -> Result<(&[u8], &[u8]), SnapshotError> {
    if bytes.len() < n {
        return Err(SnapshotError::Malformed);
    }
    Ok(bytes.split_at(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snap() -> Snapshot {
        Snapshot {
            scope: "ten_a".into(),
            session: "conv_1".into(),
            tokens: vec![2, 105, 2364, -1],
            state: vec![7; 100],
        }
    }

    #[test]
    fn a_snapshot_round_trips_on_the_same_engine() {
        let bytes = snap().encode("gemma|ctx=8192");
        assert_eq!(Snapshot::decode(&bytes, "gemma|ctx=8192"), Ok(snap()));
    }

    #[test]
    fn another_engine_refuses_it() {
        let bytes = snap().encode("gemma|ctx=8192");
        assert_eq!(
            Snapshot::decode(&bytes, "gemma|ctx=4096"),
            Err(SnapshotError::Mismatch("gemma|ctx=8192".into()))
        );
    }

    #[test]
    fn damaged_bytes_are_refused() {
        let bytes = snap().encode("f");
        for cut in [0, 3, 8, 20, bytes.len() - 100] {
            assert_eq!(
                Snapshot::decode(&bytes[..cut], "f"),
                Err(SnapshotError::Malformed),
                "{cut}"
            );
        }
        assert_eq!(
            Snapshot::decode(b"GGUF....", "f"),
            Err(SnapshotError::Malformed)
        );
    }

    #[test]
    fn ids_come_from_the_header_alone() {
        let bytes = snap().encode("f");
        assert_eq!(
            Snapshot::ids(&bytes[..40]),
            Err(SnapshotError::Malformed),
            "the header is cut"
        );
        let header_end = 8 + u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        assert_eq!(
            Snapshot::ids(&bytes[..header_end]),
            Ok(("ten_a".into(), "conv_1".into()))
        );
    }

    #[test]
    fn frames_split_an_export_and_stop_at_a_torn_end() {
        let mut body = Vec::new();
        for part in [&b"one"[..], b"second", b""] {
            frame(&mut body, part);
        }
        assert_eq!(frames(&body), vec![&b"one"[..], b"second", b""]);
        assert_eq!(frames(&body[..body.len() - 9]), vec![&b"one"[..]]);
        assert!(frames(&[]).is_empty());
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"x");
        assert!(frames(&huge).is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = Snapshot::decode(&framed, "f");
            let _ = Snapshot::decode(&bytes, "f");
        }
    }
}
